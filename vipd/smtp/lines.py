"""Byte framing for SMTP: CRLF-strict command lines and the DATA body up to CRLF.CRLF.

Rules:
- Only CRLF ends a command line. A bare LF ends the line too (so the session stays in step) but the
  line is refused; a bare CR or NUL inside the line is refused. An over-long line is consumed to its
  end and refused once: it is never cut and run as a shorter command.
- Only ``CRLF . CRLF`` ends DATA (RFC 5321 4.1.1.4). A bare CR or LF anywhere in the body refuses the
  whole message (SMTP smuggling, CVE-2023-51764 class), as do NUL bytes when so configured. The
  refused part is never handed out, so nothing ambiguous can reach a backend.
- The body is handed out still dot-stuffed, in the client's own chunks, checked with C-speed byte
  searches only: forwarding it needs no per-line Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import replies
from .replies import Reply

__all__ = ["LineReader", "DataReader", "ChunkReader", "BodyChunk", "unstuff"]

_END = b"\r\n.\r\n"
_HOLD = len(_END) - 1


def _fault(nul: bool, bare: bool, too_big: bool, long: bool) -> Reply | None:
    """The reply refusing a message body, by DATA and BDAT alike: faults in a fixed order, so the
    verdict never depends on where the stream was cut."""
    if nul:
        return replies.NUL_IN_DATA
    if bare:
        return replies.BARE_LINE_ENDING
    if too_big:
        return replies.TOO_BIG
    if long:
        return replies.DATA_LINE_TOO_LONG
    return None


class LineReader:
    """Cuts command lines from a buffer; bounded memory whatever the peer sends."""

    __slots__ = ("max_line", "_discarding")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._discarding = False

    def next_line(self, buf: bytearray) -> bytes | Reply | None:
        """Remove one line from ``buf``: its bytes without CRLF, a Reply refusing it, or None (need more)."""
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self.max_line:
                # Keep reading to the end of this line, then refuse it once.
                self._discarding = True
                del buf[:]
            return None
        if self._discarding or nl + 1 > self.max_line:
            self._discarding = False
            del buf[: nl + 1]
            return replies.LINE_TOO_LONG
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if not line.endswith(b"\r"):
            return replies.BARE_LF_COMMAND
        line = line[:-1]
        if b"\r" in line or b"\x00" in line:
            return replies.BAD_CHARACTERS
        return line


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """A validated piece of the message body, still dot-stuffed, with CRLF line ends."""

    data: bytes


class DataReader:
    """Finds the end of DATA and checks the body as it streams; one instance per message.

    The verdict must not depend on how TCP cut the stream: every segment is scanned (with C-speed
    searches) even after a fault was found, faults are sticky flags, and ``error`` is chosen from
    them in a fixed order (NUL, bare CR/LF, size, line length). ``size`` counts the whole body.
    """

    __slots__ = ("max_bytes", "max_line", "reject_nul", "size", "error", "_line_len", "_line_dot",
                 "_at_line_start", "_nul", "_bare", "_long")

    def __init__(self, max_bytes: int, max_line: int, reject_nul: bool) -> None:
        self.max_bytes = max_bytes
        self.max_line = max_line          # octets including CRLF, not counting a stuffing dot; 0: no limit
        self.reject_nul = reject_nul
        self.size = 0                     # octets after dot-unstuffing (RFC 1870 counts these)
        self.error: Reply | None = None
        self._line_len = 0                # length so far of the line that continues into the next chunk
        self._line_dot = False            # that line starts with '.' (stuffed: one octet not counted)
        self._at_line_start = True
        self._nul = self._bare = self._long = False

    def read(self, buf: bytearray) -> tuple[BodyChunk | None, bool]:
        """Take what can be taken from ``buf``: (a chunk to hand out or None, whether DATA ended)."""
        if self._at_line_start and buf[:3] == b".\r\n":
            del buf[:3]
            return None, True
        end = buf.find(_END)
        if end >= 0:
            seg = bytes(buf[: end + 2])
            del buf[: end + len(_END)]
            done = True
        else:
            cut = len(buf) - _HOLD
            if cut > 0 and buf[cut - 1] == 0x0D:
                cut -= 1           # never split a CRLF: the checks below need both halves
            if cut <= 0:
                return None, False
            seg = bytes(buf[:cut])
            del buf[:cut]
            done = False
        if not seg:
            return None, done
        self._scan(seg)
        self._at_line_start = seg.endswith(b"\r\n")
        self.error = self._verdict()
        return (BodyChunk(seg) if self.error is None else None), done

    def _scan(self, seg: bytes) -> None:
        if self.reject_nul and not self._nul and b"\x00" in seg:
            self._nul = True
        if not (self._bare or self._nul):
            crlf = seg.count(b"\r\n")
            if seg.count(b"\n") != crlf or seg.count(b"\r") != crlf:
                self._bare = True
        # memchr first: most segments (and every base64 part) have no '.' at all.
        dots = 0 if b"." not in seg else (
            seg.count(b"\r\n.") + (1 if self._at_line_start and seg[:1] == b"." else 0))
        self.size += len(seg) - dots
        if self.max_line and not (self._nul or self._bare or self._long or self.size > self.max_bytes):
            self._long = self._check_lines(seg)

    def _verdict(self) -> Reply | None:
        return _fault(self._nul, self._bare, self.size > self.max_bytes, self._long)

    def _within(self, seg: bytes, limit: int) -> bool:
        """Quick and strict: every line of ``seg`` (and its unfinished tail) fits in ``limit`` octets.

        Steps from line end to line end a whole window at a time (one C-speed rfind per ``limit``
        octets, not per line). False only means "look closer" (the exact check below).
        """
        n = len(seg)
        start = -self._line_len                 # where the current line began, relative to seg
        while start + limit <= n:
            nl = seg.rfind(b"\n", max(start, 0), start + limit)
            if nl < 0:
                return False
            start = nl + 1
        return True

    def _check_lines(self, seg: bytes) -> bool:
        """Track line lengths; True once a line is (or is bound to be) over the limit.

        RFC 5321 4.5.3.1.6: at most ``max_line`` octets including CRLF, not counting the leading
        dot duplicated for transparency, so a line that starts with '.' may be one octet longer.
        """
        limit = self.max_line
        if self._line_len == 0:
            self._line_dot = seg[:1] == b"."
        if self._line_len + len(seg) <= limit or self._within(seg, limit):
            tail = seg.rfind(b"\n")
            if tail < 0:
                self._line_len += len(seg)
            else:
                self._line_len = len(seg) - tail - 1
                self._line_dot = seg[tail + 1: tail + 2] == b"."
            return False
        pieces = seg.split(b"\n")
        # pieces[:-1] each end a line (with their CR; +1 for the LF); pieces[-1] continues.
        if len(pieces) > 1:
            if self._line_len + len(pieces[0]) + 1 > limit + self._line_dot:
                return True
            middle = pieces[1:-1]
            longest = max(map(len, middle), default=0) + 1
            if longest > limit + 1:
                return True
            if longest == limit + 1 and any(len(p) == limit and p[:1] != b"." for p in middle):
                return True
            self._line_len = 0
            self._line_dot = pieces[-1][:1] == b"."
        self._line_len += len(pieces[-1])
        # An unfinished line still needs at least its LF.
        return self._line_len + 1 > limit + self._line_dot


def unstuff(body: bytes) -> bytes:
    """Remove dot-stuffing from a whole body: every line that starts with '.' loses that first dot."""
    out = body.replace(b"\r\n.", b"\r\n")
    return out[1:] if out.startswith(b".") else out


class ChunkReader:
    """Reads the octets of BDAT chunks (RFC 3030) and hands them out in DATA's wire form.

    One instance per message; ``start`` begins each chunk. The content comes out dot-stuffed and
    ending in CRLF, so it can be relayed with DATA to any backend, CHUNKING or not. The checks are
    DataReader's: a bare CR or LF (which DATA on a backend could read as a line end: smuggling) or a
    NUL refuses the whole message, as does a size over the limit; faults are sticky, and every octet
    of every announced chunk is consumed whatever the verdict, so the session stays in step.
    """

    __slots__ = ("max_bytes", "max_line", "reject_nul", "size", "error", "remaining", "last", "_carry_cr",
                 "_at_line_start", "_nul", "_bare", "_ended", "_line_len", "_long")

    def __init__(self, max_bytes: int, reject_nul: bool, max_line: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_line = max_line          # octets including CRLF; 0: no limit (as DataReader)
        self._line_len = 0
        self._long = False
        self.reject_nul = reject_nul
        self.size = 0
        self.error: Reply | None = None
        self.remaining = 0
        self.last = False
        self._carry_cr = False          # the previous octet was a CR that may start a CRLF
        self._at_line_start = True
        self._nul = self._bare = False
        self._ended = False             # content so far ends with CRLF

    def start(self, size: int, last: bool) -> None:
        self.remaining, self.last = size, last

    def read(self, buf: bytearray) -> tuple[BodyChunk | None, bool]:
        """Take this chunk's octets from ``buf``: (stuffed content or None, whether the chunk is complete)."""
        take = min(len(buf), self.remaining)
        seg = bytes(buf[:take])
        del buf[:take]
        self.remaining -= take
        done = self.remaining == 0
        final = done and self.last
        out = self._convert(seg, final) if seg or final else b""
        self.error = self._verdict()
        return (BodyChunk(out) if out and self.error is None else None), done

    def _convert(self, seg: bytes, final: bool) -> bytes:
        self.size += len(seg)
        if self.reject_nul and b"\x00" in seg:
            self._nul = True
        view = (b"\r" if self._carry_cr else b"") + seg
        trailing_cr = view.endswith(b"\r")
        core = view[:-1] if trailing_cr else view
        crlf = core.count(b"\r\n")
        if core.count(b"\n") != crlf or core.count(b"\r") != crlf:
            self._bare = True
        self._carry_cr = trailing_cr
        if final and trailing_cr:
            self._bare = True               # the message ends in a lone CR
        if self.max_line and not self._long:
            self._long = self._too_long(seg)
        out = seg.replace(b"\n.", b"\n..")
        if self._at_line_start and seg[:1] == b".":
            out = b"." + out
        if seg:
            self._at_line_start = seg.endswith(b"\n")
            self._ended = view.endswith(b"\r\n")
        if final and not self._ended:
            # DATA needs CRLF before the final dot; the line it ends must still fit with it.
            if self.max_line and not self._long and self._line_len + 2 > self.max_line:
                self._long = True
            out += b"\r\n"
        return out

    def _too_long(self, seg: bytes) -> bool:
        """Whether a line (CRLF included) runs past ``max_line``; lines may continue across chunks."""
        last_nl = seg.rfind(b"\n")
        if last_nl < 0:
            self._line_len += len(seg)
            return self._line_len > self.max_line
        first_nl = seg.find(b"\n")
        if self._line_len + first_nl + 1 > self.max_line:
            return True
        if first_nl < last_nl and max(map(len, seg[first_nl + 1:last_nl].split(b"\n"))) + 1 > self.max_line:
            return True
        self._line_len = len(seg) - last_nl - 1
        return self._line_len > self.max_line

    def _verdict(self) -> Reply | None:
        return _fault(self._nul, self._bare, self.size > self.max_bytes, self._long)
