"""Unit tests for the spam step's pure parts: spamd's reply parser, the tagging of a message, hooks."""

from __future__ import annotations

import asyncio
from email import message_from_bytes
from email.policy import SMTP

import pytest
from hypothesis import given, strategies as st

from backends.spam import SpamResult, load_hook, score_with, spamd_scorer, status_line, tag
from backends.spamd import SpamdProtocolError, parse_spamd_reply

SPAM = SpamResult(True, 1000.1, 5.0, ("GTUBE", "MISSING_DATE"))
HAM = SpamResult(False, -0.5, 5.0, ())


# --- spamd's reply --------------------------------------------------------------------------------------

def test_a_symbols_reply_gives_verdict_score_threshold_and_rules() -> None:
    reply = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 18\r\nSpam: True ; 1000.1 / 5.0\r\n\r\nGTUBE,MISSING_DATE"
    assert parse_spamd_reply(reply) == SPAM


def test_a_check_reply_has_no_rules_and_negative_scores_parse() -> None:
    assert parse_spamd_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.5 / 5.0\r\n\r\n") == HAM


@pytest.mark.parametrize("reply, why", [
    (b"SPAMD/1.0 76 Bad header line: (EOF)\r\n\r\n", "spamd error 76"),
    (b"HTTP/1.1 200 OK\r\nSpam: True ; 1 / 5\r\n\r\n", "not a spamd reply"),
    (b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n", "without a Spam: header"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 99\r\nSpam: True ; 1 / 5\r\n\r\nGTUBE", "Content-length says 99"),
    (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n", "without an end of headers"),
    (b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\nSpam: True ; 1 / 5\r\n\r\n", "bad spamd header line"),
])
def test_anything_else_is_a_protocol_error_that_says_what(reply: bytes, why: str) -> None:
    with pytest.raises(SpamdProtocolError, match=why):
        parse_spamd_reply(reply)


# --- tagging --------------------------------------------------------------------------------------------

def test_tag_adds_spamassassin_style_headers() -> None:
    tagged = tag(b"Subject: hi\r\n\r\nbody\r\n", SPAM)
    msg = message_from_bytes(tagged, policy=SMTP)
    assert msg["X-Spam-Flag"] == "YES"
    assert msg["X-Spam-Score"] == "1000.1"
    assert msg["X-Spam-Status"] == "Yes, score=1000.1 required=5.0 tests=GTUBE,MISSING_DATE"
    assert tagged.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert status_line(HAM) == "No, score=-0.5 required=5.0 tests=none"


def test_forged_spam_headers_are_removed_with_their_folded_lines_but_not_from_the_body() -> None:
    forged = (b"X-Spam-Flag: NO\r\nSubject: hi\r\nx-spam-status: No, score=-100\r\n\ttests=FORGED\r\n"
              b"X-Spam-Level: \r\n\r\nX-Spam-Flag: NO stays, it is body text\r\n")
    tagged = tag(forged, SPAM)
    assert tagged.count(b"X-Spam-Flag: NO") == 1 and b"FORGED" not in tagged and b"X-Spam-Level" not in tagged
    assert tagged.endswith(b"Subject: hi\r\n\r\nX-Spam-Flag: NO stays, it is body text\r\n")


def test_a_long_rule_list_is_folded_under_78_characters() -> None:
    many = SpamResult(True, 12.0, 5.0, tuple(f"SOME_LONG_RULE_NAME_{i}" for i in range(12)))
    head = tag(b"\r\nbody", many).split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    status = message_from_bytes(tag(b"Subject: x\r\n\r\nbody", many), policy=SMTP)["X-Spam-Status"]
    assert "".join(status.split()).endswith("SOME_LONG_RULE_NAME_10,SOME_LONG_RULE_NAME_11")


header_line = st.builds(lambda n, v: n + b": " + v + b"\r\n",
                        st.sampled_from([b"Subject", b"X-Spam-Flag", b"X-Spam-Status", b"From", b"X-Other"]),
                        st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))


@given(st.lists(header_line, max_size=8), st.binary(max_size=60), st.booleans(), st.booleans())
def test_tagging_twice_leaves_one_verdict_and_the_body_alone(headers: list[bytes], body: bytes, first: bool,
                                                             second: bool) -> None:
    message = b"".join(headers) + b"\r\n" + body
    twice = tag(tag(message, SpamResult(first, 1.0, 5.0)), SpamResult(second, 9.0, 5.0))
    head, _, rest = twice.partition(b"\r\n\r\n")
    names = [line.split(b":")[0].lower() for line in head.split(b"\r\n")]
    assert names.count(b"x-spam-flag") == 1 and names.count(b"x-spam-status") == 1
    assert (b"X-Spam-Flag: YES" if second else b"X-Spam-Flag: NO") in head
    assert rest == body


# --- hooks ----------------------------------------------------------------------------------------------

def always_spam(message: bytes) -> SpamResult:
    return SpamResult(True, float(len(message)), 5.0, ("HOOK",))


def test_a_hook_is_loaded_by_name_and_may_be_sync_or_async() -> None:
    hook = load_hook(f"{__name__}:always_spam")
    assert asyncio.run(score_with(hook, b"12345678")) == SpamResult(True, 8.0, 5.0, ("HOOK",))

    async def async_hook(message: bytes) -> SpamResult:
        return HAM
    assert asyncio.run(score_with(async_hook, b"x")) == HAM
    with pytest.raises(TypeError, match="not a SpamResult"):
        asyncio.run(score_with(lambda m: 5.0, b"x"))


@pytest.mark.parametrize("spec, why", [
    ("no_colon", "package.module:function"),
    ("no.such.module:f", "cannot import no.such.module"),
    (f"{__name__}:missing", "has no function missing"),
    (f"{__name__}:SPAM", "has no function SPAM"),
])
def test_a_bad_hook_says_what_is_wrong(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        load_hook(spec)


@pytest.mark.parametrize("address", ["spamd", "host:port", ""])
def test_a_bad_spamd_address_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="unix:PATH or HOST:PORT"):
        spamd_scorer(address)
