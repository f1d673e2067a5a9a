"""Delivery status notifications: what Python's own MIME parser reads back from vipd.spool.dsn."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.spool.dsn import FailedRecipient, build_dsn

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ARRIVAL = NOW - timedelta(hours=4)
HEADERS = (b"Received: from client.example.org ([192.0.2.7])\r\n\tby mx.example.com\r\n"
           b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: lunch\r\n"
           b"Message-ID: <1@example.org>\r\n")
ORIGINAL = HEADERS + b"\r\nSee you at noon.\r\n.. a dot line, still stuffed as the client sent it\r\n"

BOB = FailedRecipient(address="bob@example.com", status="5.1.1",
                      diagnostic="550 5.1.1 <bob@example.com>: Recipient address rejected: unknown user",
                      remote_mta="mbox1.example.com", last_attempt=NOW - timedelta(minutes=1))
CAROL = FailedRecipient(address="carol@example.com", status="4.4.1", diagnostic=None,
                        remote_mta=None, last_attempt=None)


def dsn(**overrides) -> bytes:
    args = {"kind": "failed", "reporting_mta": "mx.example.com", "queue_id": "4VbQ2x1abcZ",
            "sender": "alice@example.org", "recipients": [BOB, CAROL], "arrival": ARRIVAL, "now": NOW,
            "original": ORIGINAL}
    args.update(overrides)
    return build_dsn(**args)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def assert_wire(data: bytes) -> None:
    """CRLF only, every line ends in CRLF, none longer than 998 octets (RFC 5322 section 2.1.1)."""
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998


def report_parts(data: bytes):
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert len(parts) == 3
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    assert not msg.defects and not any(part.defects for part in parts)
    return msg, parts


def status_blocks(part):
    """The per-message block and the per-recipient blocks, as dicts."""
    blocks = [dict(block.items()) for block in part.get_payload()]
    return blocks[0], blocks[1:]


def boundary_of(data: bytes) -> str:
    return parse(data).get_boundary()


# --- structure -------------------------------------------------------------------------------------

def test_failed_report_parses_as_multipart_report_with_every_field():
    out = dsn()
    assert_wire(out)
    msg, parts = report_parts(out)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.com>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert b"\r\nTo: <alice@example.org>\r\n" in out
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"].datetime == NOW
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<4VbQ2x1abcZ\.failed\.20240501120000\.[0-9a-f]{12}@mx\.example\.com>",
                        msg["Message-ID"])

    per_message, (bob, carol) = status_blocks(parts[1])
    assert per_message == {"Reporting-MTA": "dns; mx.example.com",
                           "Arrival-Date": "Wed, 01 May 2024 08:00:00 +0000"}
    assert bob == {
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mbox1.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected: "
                           "unknown user",
        "Last-Attempt-Date": "Wed, 01 May 2024 11:59:00 +0000",
    }
    # Unknown facts are left out, not written empty.
    assert carol == {"Final-Recipient": "rfc822; carol@example.com", "Action": "failed",
                     "Status": "4.4.1"}


def test_third_part_is_the_header_section_by_default():
    _, parts = report_parts(dsn())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Content-Transfer-Encoding" not in parts[2]
    # The CRLF before the delimiter belongs to the delimiter (RFC 2046 5.1.1).
    assert parts[2].get_payload() + "\r\n" == HEADERS.decode("ascii")
    assert "See you at noon" not in parts[2].get_payload()


def test_full_return_is_message_rfc822_with_the_body():
    out = dsn(return_content="full")
    assert_wire(out)
    _, parts = report_parts(out)
    assert parts[2].get_content_type() == "message/rfc822"
    returned = parts[2].get_payload()[0]
    assert returned["Subject"] == "lunch"
    assert returned["Message-ID"] == "<1@example.org>"
    assert "See you at noon." in returned.get_content()
    assert out.count(ORIGINAL.rstrip(b"\r\n")) == 1     # carried byte for byte
    assert "It's attached below." in report_parts(out)[1][0].get_content()


def test_full_return_of_8bit_original_falls_back_to_headers():
    original = HEADERS + b"\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    out = dsn(return_content="full", original=original)
    assert out.isascii()
    assert_wire(out)
    _, parts = report_parts(out)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert parts[2].get_payload() + "\r\n" == HEADERS.decode("ascii")


def test_8bit_and_overlong_header_lines_return_intact_as_quoted_printable():
    headers = (b"Subject: =?utf-8?q?x?= caf\xc3\xa9 \r\nX-Long: " + b"y" * 2000 + b"\r\n"
               b"X-Odd: a=b\tc \t\r\nX-Nul: \x00 bare\rcr\r\n")
    original = headers + b"\r\nbody\r\n"
    for return_content in ("headers", "full"):
        out = dsn(original=original, return_content=return_content)
        assert out.isascii()
        assert_wire(out)
        _, parts = report_parts(out)
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert parts[2]["Content-Transfer-Encoding"] == "quoted-printable"
        assert all(len(line) <= 76 for line in parts[2].get_payload().split("\r\n"))
        assert parts[2].get_payload(decode=True) + b"\r\n" == headers


def test_original_without_body_or_without_headers():
    _, parts = report_parts(dsn(original=b"Subject: only headers\r\n"))
    assert parts[2].get_payload() == "Subject: only headers"
    _, parts = report_parts(dsn(original=b"\r\nno header section at all\r\n"))
    assert parts[2].get_payload() == ""
    _, parts = report_parts(dsn(original=b"", return_content="full"))
    assert parts[2].get_content_type() == "text/rfc822-headers"


# --- failed and delayed ----------------------------------------------------------------------------

def test_failed_wording_and_action():
    _, parts = report_parts(dsn())
    text = parts[0].get_content()
    assert text.splitlines()[0] == "This is the mail system at host mx.example.com."
    assert "could not be delivered" in text and "Its headers are attached below." in text
    assert "WARNING" not in text and "retried" not in text
    assert "<bob@example.com>: host mbox1.example.com said: 550 5.1.1" in text
    assert "<carol@example.com>: delivery failed (status 4.4.1)" in text
    _, recipients = status_blocks(parts[1])
    assert [r["Action"] for r in recipients] == ["failed", "failed"]
    # Will-Retry-Until means nothing for a failure (RFC 3464 section 2.3.9), even when given.
    _, parts = report_parts(dsn(will_retry_until=NOW + timedelta(days=5)))
    assert all("Will-Retry-Until" not in r for r in status_blocks(parts[1])[1])


def test_delayed_wording_action_and_retry_limit():
    until = NOW + timedelta(days=4, hours=20)
    out = dsn(kind="delayed", will_retry_until=until)
    assert_wire(out)
    msg, parts = report_parts(out)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert ".delayed." in msg["Message-ID"]
    text = parts[0].get_content()
    assert "THIS IS A WARNING ONLY" in text
    assert "could not be delivered for 4.0 hours" in text
    assert "It will be retried until Mon, 06 May 2024 08:00:00 +0000." in text
    assert "<carol@example.com>: delivery is delayed (status 4.4.1)" in text
    assert parts[2].get_content_type() == "text/rfc822-headers"
    _, recipients = status_blocks(parts[1])
    assert [r["Action"] for r in recipients] == ["delayed", "delayed"]
    assert [r["Will-Retry-Until"] for r in recipients] == ["Mon, 06 May 2024 08:00:00 +0000"] * 2


def test_delayed_without_a_retry_limit_says_it_keeps_trying():
    _, parts = report_parts(dsn(kind="delayed"))
    assert "still being retried" in parts[0].get_content()
    assert all("Will-Retry-Until" not in r for r in status_blocks(parts[1])[1])


# --- refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sender", ["", "<>", " ", "\r\n"])
def test_null_sender_never_gets_a_notice(sender):
    with pytest.raises(ValueError, match="null sender"):
        dsn(sender=sender)


def test_no_recipients_bad_status_or_kind_raise():
    with pytest.raises(ValueError):
        dsn(recipients=[])
    for status in ("550", "5.1", "2.0.0", "5.1.1 extra", "x.y.z", ""):
        with pytest.raises(ValueError):
            dsn(recipients=[replace(BOB, status=status)])
    with pytest.raises(ValueError):
        dsn(kind="bounced")
    with pytest.raises(ValueError):
        dsn(return_content="body")


# --- hostile values --------------------------------------------------------------------------------

def test_crlf_in_outside_values_cannot_inject_a_field():
    evil = FailedRecipient(
        address="bob@example.com\r\nX-Evil: address",
        status="5.1.1",
        diagnostic="550-5.1.1 first line\r\n550 5.1.1 second\r\n\r\nX-Evil: diagnostic\r\n"
                   "Final-Recipient: rfc822; mallory@example.net\nAction: delivered\r",
        remote_mta="mbox1.example.com\r\nX-Evil: remote",
        last_attempt=None,
    )
    out = dsn(recipients=[evil], sender="alice@example.org\r\nX-Evil: sender",
              reporting_mta="mx.example.com\r\nX-Evil: mta", queue_id="Q\r\nX-Evil: qid")
    assert_wire(out)
    msg, parts = report_parts(out)
    assert "X-Evil" not in msg
    per_message, recipients = status_blocks(parts[1])
    assert len(recipients) == 1
    assert "X-Evil" not in per_message and "X-Evil" not in recipients[0]
    assert recipients[0]["Action"] == "failed"
    assert recipients[0]["Diagnostic-Code"].startswith("smtp; 550-5.1.1 first line 550 5.1.1 second")
    assert not re.search(rb"\r\nX-Evil", out)


def test_long_diagnostic_is_folded_and_capped():
    words = " ".join(f"word{i}" for i in range(3000))
    blob = "z" * 5000                      # no space to fold at
    recipients = [replace(BOB, diagnostic=f"550 5.7.1 {words}"),
                  replace(CAROL, diagnostic=f"450 4.4.1 {blob}", remote_mta="m" * 1500)]
    out = dsn(recipients=recipients)
    assert_wire(out)
    _, parts = report_parts(out)
    _, (bob, carol) = status_blocks(parts[1])
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.7.1 word0 word1 word2")
    assert bob["Diagnostic-Code"].endswith("...")
    assert len(bob["Diagnostic-Code"]) < 2100
    assert carol["Diagnostic-Code"].startswith("smtp; 450 4.4.1 zzz")
    # The human part wraps like any letter.
    assert all(len(line) <= 78 for line in parts[0].get_content().splitlines())


def test_non_ascii_values_keep_the_report_7bit():
    rcpt = replace(BOB, address="jos\u00e9@exampl\u00e9.com", diagnostic="550 nicht zustellbar: M\u00fcll")
    out = dsn(recipients=[rcpt])
    assert out.isascii()
    assert_wire(out)
    _, parts = report_parts(out)
    _, (block,) = status_blocks(parts[1])
    # RFC 6533's utf-8 address type in its 7-bit xtext form.
    assert block["Final-Recipient"] == "utf-8; jos\\x{E9}@exampl\\x{E9}.com"
    assert block["Diagnostic-Code"] == "smtp; 550 nicht zustellbar: M?ll"


def test_non_ascii_sender_is_addressed_in_utf8():
    out = dsn(sender="j\u00fcrgen@b\u00fccher.example")
    assert_wire(out)
    msg, _ = report_parts(out)
    assert "<j\u00fcrgen@b\u00fccher.example>".encode() in out
    # Python keeps undecoded header bytes as surrogates; they are the UTF-8 we wrote.
    spec = msg["To"].addresses[0].addr_spec
    assert spec.encode("ascii", "surrogateescape").decode("utf-8") == "j\u00fcrgen@b\u00fccher.example"


# --- identity and time -----------------------------------------------------------------------------

def test_same_inputs_same_bytes_other_recipients_other_message_id():
    assert dsn() == dsn()
    first = parse(dsn(recipients=[BOB]))["Message-ID"]
    second = parse(dsn(recipients=[CAROL]))["Message-ID"]
    later = parse(dsn(recipients=[BOB], now=NOW + timedelta(microseconds=1)))["Message-ID"]
    delayed = parse(dsn(recipients=[BOB], kind="delayed"))["Message-ID"]
    assert len({first, second, later, delayed}) == 4
    assert parse(dsn(message_id_domain="bounces.example.net"))["Message-ID"].endswith(
        "@bounces.example.net>")


def test_dates_keep_their_zone_and_naive_means_utc():
    cest = timezone(timedelta(hours=2))
    msg = parse(dsn(now=NOW.astimezone(cest)))
    assert msg["Date"] == "Wed, 01 May 2024 14:00:00 +0200"
    naive = parse(dsn(now=NOW.replace(tzinfo=None), arrival=ARRIVAL.replace(tzinfo=None)))
    assert naive["Date"] == "Wed, 01 May 2024 12:00:00 -0000"
    # A naive time names the same instant as the aware one: the id does not change.
    assert naive["Message-ID"] == parse(dsn())["Message-ID"]


# --- the boundary ----------------------------------------------------------------------------------

PLAIN_BOUNDARY = boundary_of(dsn())


def _adversarial_original(fragments: list[str]) -> bytes:
    headers = "Subject: " + " ".join(fragments)
    body = "\r\n".join(fragments)
    return f"{headers}\r\n\r\n{body}\r\n".encode("ascii")


_likely = st.sampled_from([
    PLAIN_BOUNDARY, "--" + PLAIN_BOUNDARY, "--" + PLAIN_BOUNDARY + "--", PLAIN_BOUNDARY[:-1],
    "=_4VbQ2x1abcZ.", "=_", "--", "=", "----=_Part_0", "boundary", "4VbQ2x1abcZ",
])
_printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


@given(fragments=st.lists(st.one_of(_likely, _printable), min_size=1, max_size=12),
       return_content=st.sampled_from(["headers", "full"]))
def test_boundary_never_occurs_in_the_original(fragments, return_content):
    original = _adversarial_original(fragments)
    out = dsn(original=original, return_content=return_content)
    assert_wire(out)
    boundary = boundary_of(out)
    assert boundary.encode() not in original
    _, parts = report_parts(out)
    if return_content == "full":
        assert parts[2].get_content_type() == "message/rfc822"
        returned = parts[2].get_payload()[0]
        assert returned.get_payload().rstrip("\r\n") == "\r\n".join(fragments).rstrip("\r\n")
    else:
        assert parts[2].get_payload() + "\r\n" == original.split(b"\r\n\r\n")[0].decode() + "\r\n"


def test_boundary_moves_when_the_original_holds_every_early_candidate():
    original = ORIGINAL
    seen = []
    for _ in range(5):
        boundary = boundary_of(dsn(original=original, return_content="full"))
        assert boundary not in seen
        seen.append(boundary)
        original += f"--{boundary}\r\n".encode()
    out = dsn(original=original, return_content="full")
    assert boundary_of(out) not in seen
    _, parts = report_parts(out)
    assert parts[2].get_content_type() == "message/rfc822"
    # Only what the report carries matters: with headers only, the first candidate is fine again.
    assert boundary_of(dsn(original=original)) == seen[0]


def test_boundary_avoids_outside_text_in_the_report_parts_too():
    out = dsn(recipients=[replace(BOB, diagnostic=f"550 5.1.1 --{PLAIN_BOUNDARY}--")])
    assert boundary_of(out) != PLAIN_BOUNDARY
    _, parts = report_parts(out)
    assert status_blocks(parts[1])[1][0]["Diagnostic-Code"].endswith(f"--{PLAIN_BOUNDARY}--")


def test_long_queue_id_keeps_the_message_id_on_one_line():
    out = dsn(queue_id="Q" * 3000)
    assert_wire(out)
    assert re.search(rb"\r\nMessage-ID: <Q{64}\.failed\.\S+>\r\n", out)


# --- anything at all -------------------------------------------------------------------------------

_any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=300)  # surrogates too
_recipient = st.builds(
    FailedRecipient,
    address=_any_text,
    status=st.from_regex(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
    diagnostic=st.none() | st.text(max_size=3000),
    remote_mta=st.none() | _any_text,
    last_attempt=st.none() | st.datetimes(timezones=st.none() | st.timezones()),
)


@given(recipients=st.lists(_recipient, min_size=1, max_size=4),
       sender=_any_text.map(lambda s: "a" + s),        # never the null sender
       kind=st.sampled_from(["failed", "delayed"]),
       original=st.binary(max_size=2000),
       return_content=st.sampled_from(["headers", "full"]),
       queue_id=_any_text)
def test_any_input_gives_a_clean_report(recipients, sender, kind, original, return_content, queue_id):
    out = dsn(recipients=recipients, sender=sender, kind=kind, original=original,
              return_content=return_content, queue_id=queue_id,
              will_retry_until=NOW + timedelta(days=5))
    assert_wire(out)
    msg, parts = report_parts(out)
    assert list(msg.keys()) == ["From", "To", "Subject", "Date", "Message-ID",
                                             "Auto-Submitted", "MIME-Version", "Content-Type"]
    # Only the To: header may carry UTF-8 (an internationalised sender).
    assert re.sub(rb"\r\nTo: [^\r]*", b"", out).isascii()
    _, blocks = status_blocks(parts[1])
    assert len(blocks) == len(recipients)
    for block, rcpt in zip(blocks, recipients):
        assert block["Action"] == kind
        assert block["Status"] == rcpt.status
        assert set(block) <= {"Final-Recipient", "Action", "Status", "Remote-MTA",
                              "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"}
