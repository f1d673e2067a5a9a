"""Tests for backends.scanner: the EICAR test file is found in every kind of MIME part and encoding,
near misses stay clean, broken MIME falls back to the raw bytes, limits give an error instead of
"clean", and no input makes the scanner raise.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import quopri
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.scanner import EICAR, EICAR_NAME, Limits, Verdict, is_test_file, scan_message

CRLF = email.policy.SMTP   # the default policy with CRLF line ends, as messages arrive over SMTP


def message(text: str = "Hello,\n\nsee attached.\n", subject: str = "test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["To"] = "b@example.net"
    msg["Subject"] = subject
    msg.set_content(text)
    return msg


def with_attachment(data: bytes, filename: str = "eicar.com") -> EmailMessage:
    msg = message()
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=filename)
    return msg


def forwarding(inner: EmailMessage, subject: str) -> EmailMessage:
    msg = message("Forwarded below.\n", subject)
    msg.add_attachment(inner)          # message/rfc822
    return msg


def raw(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=CRLF)


def infected(part: str) -> Verdict:
    return Verdict(True, EICAR_NAME, part, None)


CLEAN = Verdict(False, None, None, None)


# --- the standard's rules for the file itself ------------------------------------------------------

@pytest.mark.parametrize("data", [
    EICAR,
    EICAR + b"\r\n",
    EICAR + b" \t\r\n\x1a",
    EICAR + b" " * (128 - len(EICAR)),
])
def test_the_string_plus_whitespace_up_to_128_bytes_is_the_test_file(data: bytes) -> None:
    assert is_test_file(data)
    assert scan_message(data) == infected("1")


@pytest.mark.parametrize("data", [
    EICAR + b" " * (129 - len(EICAR)),          # one byte too long
    EICAR + b"\r\nx",                            # followed by something else
    b" " + EICAR,                                # not at the start
    b"See this: " + EICAR + b"\r\n",             # inside a line of text
    EICAR[:-1],                                  # truncated
    EICAR[:-1] + b"X",                           # one byte changed
    EICAR.lower(),
    EICAR + b"\x00",                             # NUL is not whitespace
])
def test_near_misses_are_clean(data: bytes) -> None:
    assert not is_test_file(data)
    assert scan_message(b"Subject: near miss\r\n\r\n" + data) == CLEAN


def test_input_that_is_not_a_message_is_scanned_line_by_line() -> None:
    # Without a header/body separator the parser records a defect and the fallback runs; it cannot
    # know where files end, so a line that is the test file counts even if more lines follow.
    assert scan_message(EICAR + b"\r\nx") == infected("raw")
    assert scan_message(b"Subject: fine\r\n\r\n" + EICAR + b"\r\nx") == CLEAN


# --- MIME parts and encodings -----------------------------------------------------------------------

def test_plain_body() -> None:
    data = b"From: a@example.org\r\nSubject: plain\r\n\r\n" + EICAR + b"\r\n"
    assert scan_message(data) == infected("1")


def test_plain_body_after_other_text_is_not_a_file_start() -> None:
    data = b"From: a@example.org\r\nSubject: plain\r\n\r\nHello\r\n" + EICAR + b"\r\n"
    assert scan_message(data).clean


def test_base64_attachment() -> None:
    data = raw(with_attachment(EICAR))
    assert b"Content-Transfer-Encoding: base64" in data and EICAR not in data
    assert scan_message(data) == infected("2")


@pytest.mark.parametrize("header", [b"BASE64", b"base64 ", b"\"base64\"", b"base64; x=y"])
def test_base64_with_odd_transfer_encoding_headers(header: bytes) -> None:
    data = raw(with_attachment(EICAR)).replace(b"Content-Transfer-Encoding: base64",
                                               b"Content-Transfer-Encoding: " + header)
    assert scan_message(data) == infected("2")


def test_base64_without_padding() -> None:
    encoded = base64.b64encode(EICAR + b"\r\n").rstrip(b"=")
    data = (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + encoded + b"\r\n")
    assert scan_message(data) == infected("1")


def test_quoted_printable_with_soft_line_breaks() -> None:
    # Every byte escaped and the lines broken by soft breaks: only a decoder can see the string.
    encoded = b"".join(b"=%02X" % c for c in EICAR)
    lines = b"=\r\n".join(encoded[i:i + 72] for i in range(0, len(encoded), 72))
    data = (b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            b"--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            + lines + b"\r\n--b1--\r\n")
    assert EICAR not in data
    assert quopri.decodestring(lines) == EICAR
    assert scan_message(data) == infected("2")


def test_uuencoded_attachment() -> None:
    encoded = binascii.b2a_uu(EICAR[:45]) + binascii.b2a_uu(EICAR[45:])
    data = (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
            b"begin 644 eicar.com\r\n" + encoded.replace(b"\n", b"\r\n") + b"`\r\nend\r\n")
    assert scan_message(data) == infected("1")


def test_message_rfc822_two_levels_deep() -> None:
    innermost = with_attachment(EICAR)
    data = raw(forwarding(forwarding(innermost, "Fwd: test"), "Fwd: Fwd: test"))
    # outer: 1 text, 2 message; inside it 2.1 text, 2.2 message; inside that 2.2.1 text, 2.2.2 eicar.com
    assert scan_message(data) == infected("2.2.2")


def test_message_rfc822_with_a_single_part_body() -> None:
    inner = message(EICAR.decode() + "\n")
    data = raw(forwarding(inner, "Fwd: test"))
    assert scan_message(data) == infected("2.1")


def test_base64_encoded_message_rfc822() -> None:
    # RFC 2046 forbids encoding message/rfc822, so parsers do not decode it; mail clients still do.
    inner = b"Subject: inner\r\n\r\n" + EICAR + b"\r\n"
    data = (b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--b1\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(inner).replace(b"\n", b"\r\n") + b"--b1--\r\n")
    assert scan_message(data) == infected("2.1")


def test_multipart_alternative() -> None:
    msg = message(EICAR.decode() + "\n")
    msg.add_alternative("<p>Hello</p>\n", subtype="html")
    data = raw(msg)
    assert b"multipart/alternative" in data
    assert scan_message(data) == infected("1")


def test_attachment_after_an_alternative_in_mixed() -> None:
    msg = message()
    msg.add_alternative("<p>Hello</p>\n", subtype="html")
    msg.add_attachment(b"%PDF-1.4 not really\n", maintype="application", subtype="pdf", filename="a.pdf")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.com")
    data = raw(msg)
    assert scan_message(data) == infected("3")


def test_clean_mail_with_attachments_is_clean() -> None:
    msg = message(f"The EICAR string starts with {EICAR[:10].decode()!r}; here is a picture.\n")
    msg.add_alternative("<p>Hello</p>\n", subtype="html")
    msg.add_attachment(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40, maintype="image", subtype="png",
                       filename="a.png")
    msg.add_attachment(message("inner\n"))
    assert scan_message(raw(msg)) == CLEAN


# --- broken MIME: the raw fallback ------------------------------------------------------------------

def test_multipart_without_boundary_parameter_falls_back_to_base64_in_the_raw_bytes() -> None:
    data = raw(with_attachment(EICAR))
    data = data.replace(b"Content-Type: multipart/mixed; boundary=", b"Content-Type: multipart/mixed; x=")
    assert scan_message(data) == infected("raw base64")


def test_boundary_that_never_appears_falls_back_to_raw_lines() -> None:
    data = (b"Content-Type: multipart/mixed; boundary=declared\r\n\r\n--other\r\nContent-Type: text/plain\r\n\r\n"
            + EICAR + b"\r\n--other--\r\n")
    assert scan_message(data) == infected("raw")


def test_unterminated_multipart_with_quoted_printable_falls_back() -> None:
    encoded = b"".join(b"=%02X" % c for c in EICAR)
    data = (b"Content-Type: multipart/mixed\r\n\r\n--b1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            + encoded + b"\r\n")
    assert scan_message(data) == infected("raw quoted-printable")


def test_binary_garbage_with_the_file_on_a_line() -> None:
    data = bytes(range(256)) + b"\n" + EICAR + b"\r\n" + bytes(range(255, -1, -1))
    assert scan_message(data).infected


def test_broken_mime_without_the_file_is_clean() -> None:
    data = b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    assert scan_message(data) == CLEAN


def test_headers_only_and_empty_input_are_clean() -> None:
    assert scan_message(b"") == CLEAN
    assert scan_message(b"Subject: nothing\r\n") == CLEAN


# --- limits: an incomplete scan is never "clean" --------------------------------------------------

def nested_multipart(levels: int, leaf: bytes = b"hello\r\n") -> bytes:
    data = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(levels - 1))
    return (b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + data
            + b"--b%d\r\nContent-Type: text/plain\r\n\r\n" % (levels - 1) + leaf)


def test_nesting_deeper_than_the_limit_is_an_error() -> None:
    assert scan_message(nested_multipart(5), Limits(max_depth=10)) == CLEAN
    verdict = scan_message(nested_multipart(12), Limits(max_depth=10))
    assert not verdict.infected and not verdict.clean
    assert verdict.error == "MIME parts nested deeper than 10 levels"


def test_nesting_deeper_than_the_parser_can_go_is_an_error() -> None:
    verdict = scan_message(nested_multipart(3000))
    assert not verdict.clean and verdict.error


def test_the_fallback_still_finds_the_file_below_the_depth_limit() -> None:
    verdict = scan_message(nested_multipart(12, EICAR + b"\r\n"), Limits(max_depth=10))
    assert verdict.infected and verdict.part == "raw"
    assert verdict.error == "MIME parts nested deeper than 10 levels"


def test_too_many_parts_is_an_error() -> None:
    msg = message()
    for i in range(20):
        msg.add_attachment(b"x%d" % i, maintype="application", subtype="octet-stream", filename=f"{i}.bin")
    assert scan_message(raw(msg), Limits(max_parts=25)) == CLEAN
    assert scan_message(raw(msg), Limits(max_parts=10)).error == "more than 10 MIME parts"


def test_an_infected_part_before_the_parts_limit_is_reported() -> None:
    msg = with_attachment(EICAR)
    for i in range(20):
        msg.add_attachment(b"x%d" % i, maintype="application", subtype="octet-stream", filename=f"{i}.bin")
    verdict = scan_message(raw(msg), Limits(max_parts=10))
    assert verdict.infected and verdict.part == "2"


def test_large_part_and_message_and_decoded_bytes_are_errors() -> None:
    data = raw(with_attachment(b"\0" * 100_000))
    assert scan_message(data) == CLEAN
    assert "exceeds the 50000-byte scan limit" in scan_message(data, Limits(max_part_bytes=50_000)).error
    assert "exceeds the 50000-byte scan limit" in scan_message(data, Limits(max_message_bytes=50_000)).error
    assert scan_message(data, Limits(max_decoded_bytes=50_000)).error == "more than 50000 decoded bytes"


# --- hostile input ------------------------------------------------------------------------------------

@given(st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    verdict = scan_message(data)
    assert isinstance(verdict, Verdict)
    assert verdict.infected == (verdict.part is not None)


MIME_LINES = [
    b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: multipart/alternative; boundary=\"b\"",
    b"Content-Type: message/rfc822", b"Content-Type: text/plain; charset=\"\xff\"",
    b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Transfer-Encoding: x-uuencode", b"Content-Type: message/rfc822; x=\"", b"Content-Type: ",
    b"--b", b"--b--", b"", b"begin 644 x", b"end", b"=", b"=ZZ", b"WDVPIVAlQEFQWzRc", b"\tfolded",
    b"From: \xe9", EICAR, base64.b64encode(EICAR),
]


@given(st.lists(st.one_of(st.sampled_from(MIME_LINES), st.binary(max_size=40)), max_size=60),
       st.sampled_from([b"\r\n", b"\n", b"\r"]))
def test_mime_shaped_garbage_never_raises(lines: list[bytes], eol: bytes) -> None:
    verdict = scan_message(eol.join(lines))
    assert isinstance(verdict, Verdict)
    assert verdict.infected or verdict.name is None


@given(st.sampled_from(["application/octet-stream", "text/plain", "image/gif", "application/zip"]),
       st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=30), st.binary(max_size=60))
def test_an_attachment_is_found_whatever_its_type_name_and_neighbours(ctype: str, filename: str,
                                                                       other: bytes) -> None:
    maintype, subtype = ctype.split("/")
    msg = message()
    msg.add_attachment(other, maintype="application", subtype="octet-stream", filename="other.bin")
    msg.add_attachment(EICAR, maintype=maintype, subtype=subtype, filename=filename)
    assert scan_message(raw(msg)) == infected("3")
