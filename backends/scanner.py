"""The built-in content scanner: finds the EICAR test file anywhere in a mail message, pure (bytes in, Verdict out).

It does no I/O and reads no clock, so a backend can call it in-line or in a worker thread and tests can
feed it anything. It never raises on any bytes, and its work is bounded by ``Limits`` (sizes and counts,
not time): parsing is linear, about 0.2 s per MB for the worst input measured (millions of short header
lines), milliseconds for ordinary mail.

What counts as the test file (the EICAR standard): a file whose first 68 bytes are the EICAR string,
optionally followed by whitespace only (space, tab, CR, LF, Ctrl-Z), 128 bytes long at most in all.
A string after other text, or followed by anything but that whitespace, is not the test file: such
near misses are clean, as the standard says.

What counts as a file in a message:

1. The body of every leaf MIME part, both as transmitted and decoded with its Content-Transfer-Encoding
   (base64, quoted-printable, uuencode). The header is read leniently, any value that contains
   ``base64`` counts as base64 (``"BASE64 "``, ``base64; x``), because mail clients decode such parts
   and a strict reading would let them through. Multipart trees are walked to any shape, and so are
   ``message/*`` parts (attached and forwarded mail); a ``message/rfc822`` part with an encoded body,
   which the parser cannot see into, is decoded and parsed again.
2. When the MIME structure is broken (the parser recorded a defect, failed, or a limit stopped the
   walk), the raw bytes as well, in a fallback that cannot know where files start or end, so it takes
   every line as one: every line that is the EICAR string plus whitespace (128 bytes at most, more lines
   may follow); the same for the raw bytes decoded as quoted-printable; and the content of every run of
   base64-looking lines, decoded, taken as a file and scanned line by line again (three levels deep).

Parts are named by their IMAP section number (RFC 3501 6.4.5): "1" is the body of a single-part
message, "2.1" the first part inside the second part; "raw", "raw quoted-printable" and "raw base64"
name the fallback. No file name or other text from the message is echoed, so a verdict is safe to log.

A verdict is infected, clean, or unscanned: a scanner that could not look at everything must not say
clean. ``Verdict.error`` says why the scan was incomplete (a limit exceeded, a parser failure);
an infection found before that still counts (``infected`` wins). ``Verdict.clean`` is true only with
neither.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

__all__ = ["EICAR", "EICAR_NAME", "LIMITS", "Limits", "Verdict", "is_test_file", "scan_message"]

# Split in two so that this source file is not itself the string that desktop virus scanners
# quarantine (some flag it anywhere in a file, not only at the start as the standard says).
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature"
EICAR_MAX_FILE_BYTES = 128
EICAR_WHITESPACE = b" \t\r\n\x1a"

# The fallback recurses into decoded base64 runs; three levels cover base64 inside base64 inside
# a broken message, and each level is smaller than the last, so the work stays linear.
FALLBACK_LEVELS = 3
# Base64 of 68 bytes takes 92 characters; a shorter run cannot hold the test file.
MIN_BASE64_RUN = 92
_BASE64_RUN = re.compile(rb"(?m)(?:^[A-Za-z0-9+/=]{4,}[ \t]*\r?(?:\n|\Z))+")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(c for c in range(256) if c not in _BASE64_ALPHABET)


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one scan may look at; past a limit the verdict carries an error, never "clean"."""
    max_message_bytes: int = 64 * 1024 * 1024
    max_parts: int = 1000                        # MIME nodes of every kind, containers included
    max_depth: int = 20                          # nested multipart and message/* levels
    max_part_bytes: int = 32 * 1024 * 1024       # one leaf body, as transmitted
    max_decoded_bytes: int = 128 * 1024 * 1024   # all decoded bodies together


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Verdict:
    infected: bool
    name: str | None = None
    part: str | None = None
    error: str | None = None

    @property
    def clean(self) -> bool:
        """True only when everything was scanned and nothing was found."""
        return not self.infected and self.error is None


def is_test_file(data: bytes) -> bool:
    """Whether ``data``, taken as one whole file, is the EICAR test file by the standard's rules."""
    return (len(data) <= EICAR_MAX_FILE_BYTES and data.startswith(EICAR)
            and not data[len(EICAR):].translate(None, EICAR_WHITESPACE))


def scan_message(raw: bytes, limits: Limits = LIMITS) -> Verdict:
    """Scan one message (headers and body, as received); see the module docstring for the rules."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"scan_message() takes bytes, not {type(raw).__name__}")
    data = bytes(raw)
    scan = _Scan(limits)
    try:
        if len(data) > limits.max_message_bytes:
            scan.fail(f"message of {len(data)} bytes exceeds the {limits.max_message_bytes}-byte scan limit")
            data = data[:limits.max_message_bytes]
        else:
            scan.walk(data)
    except Exception as exc:  # noqa: BLE001 - a parser bug or hostile input ends as "unscanned", not as a crash
        scan.fail(f"scan failed: {type(exc).__name__}")
        data = data[:limits.max_message_bytes]
    if scan.found is None and scan.broken:
        try:
            scan.fallback(data)
        except Exception as exc:  # noqa: BLE001 - as above: the fallback sees the most hostile input
            scan.fail(f"raw scan failed: {type(exc).__name__}")
    return scan.verdict()


class _Scan:
    """One scan's state: what was found, what went wrong, and the budgets spent so far."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.found: str | None = None          # the part holding the test file
        self.error: str | None = None          # the first reason the scan is incomplete
        self.broken = False                    # the MIME tree cannot be trusted: run the fallback
        self.parts = 0
        self.decoded_bytes = 0

    def fail(self, reason: str) -> None:
        self.broken = True
        if self.error is None:
            self.error = reason

    def verdict(self) -> Verdict:
        if self.found is not None:
            return Verdict(True, EICAR_NAME, self.found, self.error)
        return Verdict(False, None, None, self.error)

    # --- the MIME tree ---------------------------------------------------------------------------

    def walk(self, raw: bytes) -> None:
        root = self._parse(raw)
        if root is None:
            return
        # An explicit stack, not recursion: depth is ours to limit, not the interpreter's to overflow.
        # Children are pushed in reverse so that the first infected part in document order is reported.
        stack: list[tuple[Message, str, int, bool]] = [(root, "", 0, True)]
        while stack and self.found is None:
            node, section, depth, is_root = stack.pop()
            self.parts += 1
            if self.parts > self.limits.max_parts:
                self.fail(f"more than {self.limits.max_parts} MIME parts")
                return
            try:
                if node.defects:
                    self.broken = True
                if node.is_multipart():
                    if depth >= self.limits.max_depth:
                        self.fail(f"MIME parts nested deeper than {self.limits.max_depth} levels")
                        continue
                    stack.extend(reversed(self._children(node, section, depth)))
                else:
                    self._check_leaf(node, _sub(section, 1) if is_root else section)
            except Exception as exc:  # noqa: BLE001 - one odd part must not hide the others from the scan
                self.fail(f"part {section or '1'}: {type(exc).__name__}")

    def _children(self, node: Message, section: str, depth: int) -> list[tuple[Message, str, int, bool]]:
        payload = node.get_payload()
        children = [c for c in payload if isinstance(c, Message)] if isinstance(payload, list) else []
        if node.get_content_maintype() != "message":
            return [(child, _sub(section, i), depth + 1, False) for i, child in enumerate(children, 1)]
        # An attached message is numbered like a top-level one under its own section (IMAP).
        out = [(child, section if len(children) == 1 else _sub(section, i), depth + 1, True)
               for i, child in enumerate(children, 1)]
        encodings = _encodings(node)
        if encodings:
            # The parser ignores the transfer encoding of message/* (RFC 2046 forbids one) and reads
            # the encoded text as a header-less message: decode it and parse the real one as well.
            for child in children:
                for decoded in self._decodings(_as_bytes(child), encodings):
                    inner = self._parse(decoded)
                    if inner is not None:
                        out.append((inner, section, depth + 1, True))
        return out

    def _check_leaf(self, node: Message, section: str) -> None:
        body = _payload_bytes(node.get_payload())
        if len(body) > self.limits.max_part_bytes:
            self.fail(f"part {section} of {len(body)} bytes exceeds the {self.limits.max_part_bytes}-byte scan limit")
            return
        if is_test_file(body) or any(is_test_file(d) for d in self._decodings(body, _encodings(node))):
            self.found = section

    def _decodings(self, body: bytes, encodings: set[str]) -> list[bytes]:
        out = []
        for encoding in sorted(encodings):
            decoded = _DECODERS[encoding](body)
            self.decoded_bytes += len(decoded)
            if self.decoded_bytes > self.limits.max_decoded_bytes:
                self.fail(f"more than {self.limits.max_decoded_bytes} decoded bytes")
                break
            out.append(decoded)
        return out

    def _parse(self, raw: bytes) -> Message | None:
        # compat32: the lenient parser of old, without the header objects of the newer policies,
        # whose parsing of hostile headers has raised and gone quadratic in the past.
        try:
            return email.message_from_bytes(raw, policy=email.policy.compat32)
        except Exception as exc:  # noqa: BLE001 - the fallback still scans the raw bytes; the verdict says why
            self.fail(f"MIME parser failed: {type(exc).__name__}")
            return None

    # --- the fallback over raw bytes -------------------------------------------------------------

    def fallback(self, raw: bytes) -> None:
        if _has_test_line(raw):
            self.found = "raw"
        elif _has_test_line(binascii.a2b_qp(raw)):
            self.found = "raw quoted-printable"
        elif _base64_runs_hold_test_file(raw, FALLBACK_LEVELS):
            self.found = "raw base64"


def _has_test_line(data: bytes) -> bool:
    """Whether a line of ``data`` (up to LF or the end) is the test file; no copy of the lines."""
    start = data.find(EICAR)
    while start != -1:
        if start == 0 or data[start - 1] == 0x0A:
            end = data.find(b"\n", start, start + EICAR_MAX_FILE_BYTES + 1)
            line = data[start:end if end != -1 else start + EICAR_MAX_FILE_BYTES + 1]
            if is_test_file(line):
                return True
        start = data.find(EICAR, start + 1)
    return False


def _base64_runs_hold_test_file(data: bytes, levels: int) -> bool:
    for match in _BASE64_RUN.finditer(data):
        if match.end() - match.start() < MIN_BASE64_RUN:
            continue
        decoded = _decode_base64(match.group())
        if is_test_file(decoded) or _has_test_line(decoded):
            return True
        if levels > 1 and _base64_runs_hold_test_file(decoded, levels - 1):
            return True
    return False


# --- transfer encodings, decoded as leniently as mail clients do ---------------------------------

def _encodings(node: Message) -> set[str]:
    found = set()
    for value in node.get_all("content-transfer-encoding") or ():
        text = str(value).lower()
        if "base64" in text:
            found.add("base64")
        elif "quoted" in text:
            found.add("quoted-printable")
        elif "uu" in text:
            found.add("uuencode")
    return found


def _decode_base64(data: bytes) -> bytes:
    cleaned = data.translate(None, _NOT_BASE64)
    try:
        return binascii.a2b_base64(cleaned)
    except binascii.Error:
        # Missing or broken padding: decode what is there, as clients do, instead of seeing nothing.
        body = cleaned.partition(b"=")[0]
        body = body[:len(body) - len(body) % 4] if len(body) % 4 == 1 else body
        return binascii.a2b_base64(body + b"=" * (-len(body) % 4))


def _decode_qp(data: bytes) -> bytes:
    return binascii.a2b_qp(data)


def _decode_uu(data: bytes) -> bytes:
    out = bytearray()
    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith(b"begin"):
            break
    for line in lines:
        if line.strip() == b"end":
            break
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Some encoders pad lines with junk: keep the bytes the length character promises.
            if line:
                try:
                    out += binascii.a2b_uu(line[:(((line[0] - 32) & 63) * 4 + 5) // 3])
                except binascii.Error:
                    pass
    return bytes(out)


_DECODERS = {"base64": _decode_base64, "quoted-printable": _decode_qp, "uuencode": _decode_uu}


def _payload_bytes(payload: object) -> bytes:
    # The bytes parser keeps undecodable bytes as surrogates; encoding back gives the bytes received.
    if isinstance(payload, bytes):
        return payload
    if not isinstance(payload, str):
        return b""
    try:
        return payload.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return payload.encode("utf-8", "surrogateescape")


def _as_bytes(node: Message) -> bytes:
    if not node.is_multipart() and not node.keys():
        return _payload_bytes(node.get_payload())
    return node.as_bytes()


def _sub(section: str, index: int) -> str:
    return f"{section}.{index}" if section else str(index)
