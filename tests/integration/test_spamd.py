"""Tests for backends.spamd against a real spamd (Debian's spamd package) started by the test itself,
and for the content backend's spam step with it.

spamd runs with a small rule set written at test time (backends.spamd_daemon: GTUBE and a few header
rules), local tests only, on a loopback port and a unix socket; it is stopped by PID at the end, also
on failure. Skips when spamd is not installed or does not start, unless CI is set: there that fails.
The failure paths (nothing listening, silence, garbage, a closed connection) use small servers of
their own and always run.
"""

from __future__ import annotations

import asyncio
import re
import time
from email import message_from_bytes
from email.policy import SMTP
from pathlib import Path

import pytest

from backends.spam import SpamResult
from backends.spamd import SpamdProtocolError, SpamdTimeout, SpamdUnavailable, spamd_check, spamd_ping
from backends.spamd_daemon import SpamdDaemon
from clamd_lab import free_port
from spamd_lab import GTUBE, run_spamd
from support import Lab, run_against, send_data, wait_for

pytestmark = pytest.mark.timeout(60)

SPAM_MAIL = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: offer\r\nDate: Thu, 3 Dec 2026 07:00:00 +0000\r\n" \
            b"\r\n" + GTUBE + b"\r\n"
HAM_MAIL = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: lunch\r\nDate: Thu, 3 Dec 2026 07:00:00 +0000\r\n" \
           b"\r\nAt noon?\r\n"


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    yield from run_spamd(tmp_path_factory)


def check(message: bytes, **where) -> SpamResult:
    return asyncio.run(spamd_check(message, **where))


# --- with the real spamd --------------------------------------------------------------------------------

def test_spamd_answers_ping_on_both_sockets(spamd: SpamdDaemon) -> None:
    print(f"spamd answered PING {spamd.start_seconds:.2f} s after start")
    assert asyncio.run(spamd_ping(host="127.0.0.1", port=spamd.port))
    assert asyncio.run(spamd_ping(unix_path=spamd.unix_path))


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_gtube_is_spam_and_plain_mail_is_not(spamd: SpamdDaemon, where: str) -> None:
    address = {"host": "127.0.0.1", "port": spamd.port} if where == "tcp" else {"unix_path": spamd.unix_path}
    assert check(SPAM_MAIL, **address) == SpamResult(True, 1000.0, 5.0, ("GTUBE",))
    assert check(HAM_MAIL, **address) == SpamResult(False, 0.0, 5.0, ())


def test_rules_add_up_and_a_user_may_be_named(spamd: SpamdDaemon) -> None:
    result = check(b"From: a@example.org\r\n\r\nbuy cheap pills now\r\n", unix_path=spamd.unix_path, user="nobody")
    assert result.spam and result.score == pytest.approx(6.6)
    assert set(result.rules) == {"MISSING_DATE", "MISSING_SUBJECT", "VIPD_LAB_SPAMMY"}


def test_concurrent_checks(spamd: SpamdDaemon) -> None:
    async def many() -> list[SpamResult]:
        return await asyncio.gather(*(spamd_check(SPAM_MAIL if i % 2 else HAM_MAIL, unix_path=spamd.unix_path)
                                      for i in range(10)))
    assert [r.spam for r in asyncio.run(many())] == [bool(i % 2) for i in range(10)]


# --- failure paths, with small servers of our own ------------------------------------------------------

def test_nothing_listening_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SpamdUnavailable):
        check(HAM_MAIL, unix_path=str(tmp_path / "missing.sock"))
    with pytest.raises(SpamdUnavailable):
        check(HAM_MAIL, host="127.0.0.1", port=free_port())
    assert asyncio.run(spamd_ping(host="127.0.0.1", port=free_port())) is False


def test_silence_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    async def silent(reader, writer):
        await reader.read()
        await asyncio.sleep(30)

    began = time.monotonic()
    with pytest.raises(SpamdTimeout):
        run_against(silent, tmp_path, lambda path: spamd_check(HAM_MAIL, unix_path=path, timeout=0.3))
    assert time.monotonic() - began < 5
    assert run_against(silent, tmp_path, lambda path: spamd_ping(unix_path=path, timeout=0.3)) is False


@pytest.mark.parametrize("reply", [b"220 mail.example ESMTP\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: perhaps\r\n\r\n",
                                   b"SPAMD/1.1 0 EX_OK\r\n" + b"X-Filler: x\r\n" * 10_000])
def test_a_reply_that_is_not_spamd_is_a_protocol_error(tmp_path: Path, reply: bytes) -> None:
    async def liar(reader, writer):
        await reader.read()
        writer.write(reply)
        await writer.drain()

    with pytest.raises(SpamdProtocolError):
        run_against(liar, tmp_path, lambda path: spamd_check(HAM_MAIL, unix_path=path, timeout=5))
    assert run_against(liar, tmp_path, lambda path: spamd_ping(unix_path=path, timeout=5)) is False


def test_closed_without_a_reply_is_unavailable(tmp_path: Path) -> None:
    async def closer(reader, writer):
        writer.close()

    with pytest.raises(SpamdUnavailable):
        run_against(closer, tmp_path, lambda path: spamd_check(HAM_MAIL, unix_path=path, timeout=5))


def test_arguments_must_name_one_socket() -> None:
    with pytest.raises(ValueError):
        check(HAM_MAIL)
    with pytest.raises(ValueError):
        check(HAM_MAIL, unix_path="/x", host="127.0.0.1")
    with pytest.raises(ValueError, match="user"):
        check(HAM_MAIL, unix_path="/x", user="a\r\nContent-length: 0")


# --- the content backend's spam step, with the real spamd ----------------------------------------------

def test_tag_marks_spam_and_ham_and_drops_a_forged_verdict(lab: Lab, spamd: SpamdDaemon) -> None:
    sink = lab.sink("next")
    port, proc = lab.backend("content", "--next", sink.address, "--spamd", spamd.address)
    forged = b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-100.0\r\n" + SPAM_MAIL
    assert send_data(port, forged)[0] == 250
    assert send_data(port, HAM_MAIL)[0] == 250
    spam, ham = (message_from_bytes(m.body, policy=SMTP) for m in wait_for(lambda: len(sink.messages()) == 2
                                                                            and sink.messages()))
    assert spam.get_all("X-Spam-Flag") == ["YES"] and spam["X-Spam-Status"].startswith("Yes, score=1000.0")
    assert "GTUBE" in spam["X-Spam-Status"]
    assert ham["X-Spam-Flag"] == "NO" and ham["X-Spam-Status"] == "No, score=0.0 required=5.0 tests=none"
    assert re.search(r"^spam from=<a@example.org> .* detail=\"Yes, score=1000.0", proc.text(), re.M)


def test_reject_refuses_spam_with_550_and_passes_ham(lab: Lab, spamd: SpamdDaemon) -> None:
    sink = lab.sink("next")
    port, _ = lab.backend("content", "--next", sink.address, "--spamd", f"unix:{spamd.unix_path}",
                          "--spam-action", "reject")
    code, text = send_data(port, SPAM_MAIL)
    assert (code, text[:5]) == (550, b"5.7.1") and b"spam (score 1000.0, required 5.0)" in text
    assert send_data(port, HAM_MAIL)[0] == 250
    assert [m.body.count(b"At noon?") for m in wait_for(lambda: sink.messages())] == [1]


def test_spamd_down_fails_open_by_default_and_defers_when_told(lab: Lab) -> None:
    sink = lab.sink("next")
    down = f"127.0.0.1:{free_port()}"
    port, proc = lab.backend("content", "--next", sink.address, "--spamd", down)
    assert send_data(port, SPAM_MAIL)[0] == 250
    assert b"X-Spam-Flag" not in wait_for(lambda: sink.messages())[0].body
    assert "spam-unscored" in proc.text()
    port, _ = lab.backend("content", "--next", sink.address, "--spamd", down, "--spam-unavailable", "defer")
    code, text = send_data(port, SPAM_MAIL)
    assert (code, text[:5]) == (451, b"4.7.0")


def test_the_virus_scan_comes_first_and_large_mail_is_not_scored(lab: Lab, spamd: SpamdDaemon) -> None:
    from backends.scanner import EICAR
    sink = lab.sink("next")
    port, proc = lab.backend("content", "--next", sink.address, "--spamd", spamd.address, "--spam-max-size", "2000")
    code, _ = send_data(port, b"Subject: both\r\n\r\n" + EICAR + b"\r\n")
    assert code == 554
    big = SPAM_MAIL + b"filler line\r\n" * 200
    assert send_data(port, big)[0] == 250
    assert b"X-Spam-Flag" not in wait_for(lambda: sink.messages())[0].body
    assert "spam-skipped" in proc.text()


def test_a_hook_scores_instead_of_spamd(lab: Lab) -> None:
    hooks = lab.tmp / "hooks"
    hooks.mkdir()
    (hooks / "lab_spam_hook.py").write_text(
        "from backends.spam import SpamResult\n"
        "async def score(message):\n"
        "    hit = b'MAGIC' in message\n"
        "    return SpamResult(hit, 10.0 if hit else 0.0, 5.0, ('MAGIC',) if hit else ())\n")
    sink = lab.sink("next")
    port, _ = lab.backend("content", "--next", sink.address, "--spam-hook", "lab_spam_hook:score",
                          "--spam-action", "reject", env={"PYTHONPATH": str(hooks)})
    assert send_data(port, b"Subject: x\r\n\r\nMAGIC\r\n")[0] == 550
    assert send_data(port, HAM_MAIL)[0] == 250
