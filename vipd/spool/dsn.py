"""Build a delivery status notification (RFC 3464 in an RFC 6522 multipart/report) as bytes.

Rules:
- Pure: no I/O and no clock; every time is passed in. The same inputs give the same bytes, so a
  notice rebuilt after a crash is the same message with the same Message-ID.
- The result is CRLF throughout, no line is longer than 998 octets, and it is not dot-stuffed: the
  caller sends it with ``MAIL FROM:<>`` to ``sender`` and stuffs it as it writes DATA.
- Every value that came from outside (addresses, the remote server's reply text, the queue id) is
  cleaned before it reaches a header or a status field: CR and LF cannot start a new field.
- The report is 7-bit, so any relay on the way back can carry it (RFC 6152 8BITMIME is not assumed).
  The one exception is a non-ASCII sender in ``To:``: only SMTPUTF8 can reach that mailbox at all,
  so the header carries it as RFC 6532 UTF-8.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

__all__ = ["FailedRecipient", "build_dsn"]

CRLF = "\r\n"
# RFC 5322 section 2.1.1: lines SHOULD stay under 78 characters and MUST stay under 998.
_SOFT_WIDTH = 78
_HARD_WIDTH = 998
# A hostile server may answer with 100 lines of 4 KiB; one recipient's diagnostic never needs more.
_MAX_DIAGNOSTIC = 2048
_QP_WIDTH = 76

_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
# RFC 5322 atext plus '.', for the parts of a Message-ID and a boundary we derive from inputs.
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_DOMAIN_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]*\]")

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
}


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the notice reports on, with what the last attempt learned about it."""

    address: str            # the recipient as given in RCPT TO (no angle brackets)
    status: str             # enhanced status code (RFC 3463), e.g. "5.1.1" or "4.4.1"
    diagnostic: str | None  # the remote server's reply text, e.g. "550 5.1.1 <x@y>: unknown user"
    remote_mta: str | None  # e.g. "mbox1.example.com" or "127.0.0.1:2526"
    last_attempt: datetime | None


def build_dsn(*, kind: Literal["failed", "delayed"], reporting_mta: str, queue_id: str,
              sender: str, recipients: Sequence[FailedRecipient], arrival: datetime, now: datetime,
              original: bytes, return_content: Literal["full", "headers"] = "headers",
              message_id_domain: str | None = None, will_retry_until: datetime | None = None) -> bytes:
    """The whole notice for ``sender`` about ``recipients`` of message ``queue_id``, CRLF bytes.

    Naive datetimes are taken as UTC and written with the ``-0000`` zone.
    Raises ValueError for the null sender (RFC 5321 section 4.5.5: a notice about a notice could
    loop), for no recipients, for an unknown ``kind`` or ``return_content``, and for a status that
    is not a 4.x.x or 5.x.x enhanced code.
    """
    if kind not in _SUBJECTS:
        raise ValueError(f"kind must be 'failed' or 'delayed', not {kind!r}")
    if return_content not in ("full", "headers"):
        raise ValueError(f"return_content must be 'full' or 'headers', not {return_content!r}")
    to = _strip_controls(sender).strip()
    if to in ("", "<>"):
        raise ValueError("no delivery status notification is sent to the null sender")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    for rcpt in recipients:
        if not _STATUS.fullmatch(rcpt.status):
            raise ValueError(f"not a 4.x.x or 5.x.x enhanced status code: {rcpt.status!r}")

    mta = _printable(reporting_mta)
    id_domain = _id_right(message_id_domain or mta)
    # Capped so the Message-ID stays one unbroken line; the digest keeps it unique.
    qid = _atext(queue_id)[:64].strip(".") or "dsn"
    stamp = _utc(now).strftime("%Y%m%d%H%M%S.%f")
    # The digest holds the stamp to the microsecond and the recipients, so two notices in one
    # second, or about different recipients of one message (one per destination pool), differ.
    digest = _digest(queue_id, kind, stamp, *(r.address for r in recipients))

    returned = _returned(original, return_content, kind)
    parts = [
        ("text/plain; charset=us-ascii", "Notification", None,
         _human_text(kind, mta, recipients, arrival, now, will_retry_until,
                     whole=returned[0] == "message/rfc822")),
        ("message/delivery-status", "Delivery report", None,
         _status_fields(kind, mta, recipients, arrival, will_retry_until)),
        returned,
    ]
    bodies = [body for _, _, _, body in parts]
    boundary = _boundary(qid, digest, bodies)

    out = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        _field("To", f"<{to}>"),
        _field("Subject", _SUBJECTS[kind]),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{qid}.{kind}.{stamp[:14]}.{digest[:12]}@{id_domain}>"),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    # "replace": a lone surrogate in the sender must not cost the notice.
    head = (CRLF.join(out) + CRLF).encode("utf-8", "replace")
    chunks = [head]
    for content_type, description, encoding, body in parts:
        part_head = [f"--{boundary}", _field("Content-Description", description),
                     _field("Content-Type", content_type)]
        if encoding:
            part_head.append(_field("Content-Transfer-Encoding", encoding))
        chunks.append((CRLF.join(part_head) + CRLF + CRLF).encode("ascii"))
        # The CRLF before the next delimiter belongs to the delimiter (RFC 2046 section 5.1.1),
        # so a body must end with its own CRLF or its last line would run into the boundary.
        chunks.append(body if body.endswith(b"\r\n") or not body else body + b"\r\n")
    chunks.append(f"--{boundary}--{CRLF}".encode("ascii"))
    return b"".join(chunks)


# --- the three parts -------------------------------------------------------------------------------

def _human_text(kind: str, mta: str, recipients: Sequence[FailedRecipient], arrival: datetime,
                now: datetime, retry_until: datetime | None, *, whole: bool) -> bytes:
    lines = [f"This is the mail system at host {mta}.", ""]
    if kind == "failed":
        attached = "It's attached below." if whole else "Its headers are attached below."
        lines += _wrap("I'm sorry to have to inform you that your message could not be delivered "
                       f"to one or more recipients. {attached}")
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for {_duration(_utc(now) - _utc(arrival))}.",
        ]
        if retry_until is not None:
            lines.append(f"It will be retried until {_date(retry_until)}.")
        else:
            lines.append("It is still being retried.")
    lines += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    for rcpt in recipients:
        what = f"<{_address_text(rcpt.address)}>:"
        if rcpt.remote_mta:
            what += f" host {_printable(rcpt.remote_mta)}"
            what += " said:" if rcpt.diagnostic else ":"
        if rcpt.diagnostic:
            what += f" {_diagnostic(rcpt.diagnostic)}"
        else:
            what += f" delivery {'failed' if kind == 'failed' else 'is delayed'} (status {rcpt.status})"
        lines += _wrap(what)
        lines.append("")
    return (CRLF.join(lines) + CRLF).encode("ascii")


def _status_fields(kind: str, mta: str, recipients: Sequence[FailedRecipient],
                   arrival: datetime, retry_until: datetime | None) -> bytes:
    blocks = [[_field("Reporting-MTA", f"dns; {mta}"),
               _field("Arrival-Date", _date(arrival))]]
    for rcpt in recipients:
        block = [_field("Final-Recipient", _typed_address(rcpt.address)),
                 _field("Action", kind),
                 _field("Status", rcpt.status)]
        if rcpt.remote_mta:
            block.append(_field("Remote-MTA", f"dns; {_printable(rcpt.remote_mta)}"))
        if rcpt.diagnostic:
            block.append(_field("Diagnostic-Code", f"smtp; {_diagnostic(rcpt.diagnostic)}"))
        if rcpt.last_attempt is not None:
            block.append(_field("Last-Attempt-Date", _date(rcpt.last_attempt)))
        # RFC 3464 section 2.3.9: only meaningful with Action: delayed.
        if kind == "delayed" and retry_until is not None:
            block.append(_field("Will-Retry-Until", _date(retry_until)))
        blocks.append(block)
    return (CRLF + CRLF).join(CRLF.join(block) for block in blocks).encode("ascii") + b"\r\n"


def _returned(original: bytes, return_content: str,
              kind: str) -> tuple[str, str, str | None, bytes]:
    """The third part: (content type, description, transfer encoding or None, body)."""
    label = "Undelivered Message" if kind == "failed" else "Delayed Message"
    # message/rfc822 may only be 7bit, 8bit or binary (RFC 2046 section 5.2.1): it cannot be
    # re-encoded. Rather than make the whole report 8-bit (and undeliverable through a relay
    # without 8BITMIME), an original that is not clean 7-bit text is returned as headers only.
    if return_content == "full" and original and _is_7bit(original):
        return "message/rfc822", label, None, original
    headers = _header_section(original)
    if _is_7bit(headers):
        return "text/rfc822-headers", f"{label} Headers", None, headers
    # text/rfc822-headers is text, so unlike message/rfc822 it may be quoted-printable
    # (RFC 6522 section 4): 8-bit or over-long header lines go back intact and 7-bit.
    return "text/rfc822-headers", f"{label} Headers", "quoted-printable", _quoted_printable(headers)


def _header_section(original: bytes) -> bytes:
    if original.startswith(b"\r\n"):
        return b""
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[:end + 2]


def _is_7bit(data: bytes) -> bool:
    """RFC 2045 section 2.7: ASCII without NUL, CR and LF only as CRLF, lines of at most 998."""
    if not data.isascii() or b"\x00" in data:
        return False
    lines = data.split(b"\r\n")
    return all(b"\r" not in line and b"\n" not in line and len(line) <= _HARD_WIDTH
               for line in lines)


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 section 6.7, CRLF as the only line break; a bare CR or LF is kept as =0D or =0A."""
    out = []
    for line in data.split(b"\r\n"):
        encoded = []
        for i, byte in enumerate(line):
            last = i == len(line) - 1
            # Rule 3: trailing white space is encoded, or a relay could strip it.
            if (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and not last):
                encoded.append(chr(byte))
            else:
                encoded.append(f"={byte:02X}")
        # Rule 5: soft breaks ('=' at the end) keep every encoded line to 76 characters.
        current = ""
        wrapped = []
        for token in encoded:
            if len(current) + len(token) > _QP_WIDTH - 1:
                wrapped.append(current + "=")
                current = ""
            current += token
        wrapped.append(current)
        out.append(CRLF.join(wrapped))
    return CRLF.join(out).encode("ascii")


# --- field values ----------------------------------------------------------------------------------

def _field(name: str, value: str) -> str:
    """``name: value`` folded at its spaces so lines stay under 78 where they can and 998 always."""
    text = f"{name}: {value.strip()}"
    if len(text) <= _SOFT_WIDTH:
        return text
    lines: list[str] = []
    # Never fold straight after the colon: some parsers then keep the leading space in the value.
    tokens = re.findall(r"\s*\S+", text)
    tokens[:2] = ["".join(tokens[:2])]
    current = ""
    for token in tokens:
        if current and len(current) + len(token) > _SOFT_WIDTH:
            lines.append(current)
            current = token     # every token after the first starts with the space we fold at
        else:
            current += token
        # A run with no space to fold at: cut it, the only way to stay under 998. The unfolded
        # value gains a space there; that is only ever reached by text of no real meaning.
        while len(current) > _HARD_WIDTH:
            lines.append(current[:_HARD_WIDTH])
            current = " " + current[_HARD_WIDTH:]
    lines.append(current)
    return CRLF.join(lines)


def _strip_controls(text: str) -> str:
    return _CONTROLS.sub("", text)


def _printable(text: str) -> str:
    """A value from outside as one line of printable ASCII: line breaks become spaces."""
    return _NOT_PRINTABLE_ASCII.sub("?", _LINE_BREAKS.sub(" ", text).replace("\t", " ")).strip()


def _diagnostic(text: str) -> str:
    # A multi-line reply reads as one sentence once its line breaks are spaces.
    text = _printable(text)
    if len(text) > _MAX_DIAGNOSTIC:
        text = text[:_MAX_DIAGNOSTIC - 3].rstrip() + "..."
    return text


def _address_text(address: str) -> str:
    """A recipient as 7-bit text: non-ASCII as RFC 6533 ``\\x{HHHH}`` (utf-8-addr-xtext)."""
    address = _strip_controls(address).strip()
    if address.isascii():
        return address
    return "".join(c if c.isascii() and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address)


def _typed_address(address: str) -> str:
    clean = _strip_controls(address).strip()
    if clean.isascii():
        return f"rfc822; {clean}"
    # An internationalised address in a 7-bit report: RFC 6533 section 3's utf-8 type, xtext form.
    return f"utf-8; {_address_text(clean)}"


def _atext(text: str) -> str:
    return re.sub(r"\.{2,}", ".", _NOT_ATEXT.sub("-", text)).strip(".")


def _id_right(domain: str) -> str:
    """The right side of a Message-ID (RFC 5322 section 3.6.4): a dot-atom or a domain literal."""
    domain = domain.strip()
    if _DOMAIN_LITERAL.fullmatch(domain):
        return domain
    return _atext(domain) or "localhost"


def _digest(*values: str) -> str:
    h = hashlib.sha256()
    for value in values:
        h.update(value.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")       # so ("ab", "c") and ("a", "bc") differ
    return h.hexdigest()


def _boundary(qid: str, digest: str, bodies: Sequence[bytes]) -> str:
    """A boundary that occurs in no part (RFC 2046 section 5.1.1), the same for the same inputs.

    Each try is a fresh hash, so an original built to contain the first candidate only pushes us to
    the next; the loop ends because a finite body can hold only finitely many candidates.
    """
    qid_part = re.sub(r"[^A-Za-z0-9.-]", "-", qid)[:24]   # bchars without quoting subtleties
    attempt = 0
    while True:
        candidate = f"=_{qid_part}.{_digest(digest, str(attempt))[:32]}"
        token = candidate.encode("ascii")
        if not any(token in body for body in bodies):
            return candidate
        attempt += 1


# --- time ------------------------------------------------------------------------------------------

def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _date(moment: datetime) -> str:
    """RFC 5322 section 3.3 date-time, in the moment's own zone; English names whatever the locale."""
    offset = moment.utcoffset()
    if offset is None:
        zone = "-0000"      # section 3.3: UTC, with nothing known of the local zone
    else:
        minutes = int(offset.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return (f"{_DAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} "
            f"{moment.year:04d} {moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {zone}")


def _duration(span: timedelta) -> str:
    seconds = max(span.total_seconds(), 0.0)
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=_SOFT_WIDTH - 2, break_long_words=True,
                         break_on_hyphens=False) or [""]
