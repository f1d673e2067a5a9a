"""Tests for backends.clamd against a real clamd (Debian's clamav-daemon) started by the test itself.

No signature download is possible here, so the test writes its own database: one ``.ndb`` body
signature for the EICAR string, which matches it anywhere in a scanned file, also inside the mail
attachments that clamd decodes itself. clamd runs in the foreground with its unix socket, a loopback
TCP port, its log and temporary files in the test's folder, and a small StreamMaxLength; it is
stopped by PID at the end, also on failure.

Skips when clamd is not installed or does not start, unless CI is set: there that fails. The failure
paths (nothing listening, silence, garbage, a closed connection) use tiny servers of their own and
always run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from backends.clamd import (ClamdProtocolError, ClamdResult, ClamdScanError, ClamdTimeout, ClamdUnavailable,
                            clamd_ping, clamd_scan, clamd_version, parse_scan_reply)
from backends.scanner import EICAR
from support import run_against
from clamd_lab import FOUND_NAME, STREAM_MAX_BYTES, Clamd, free_port, run_clamd


@pytest.fixture(scope="module")
def clamd(tmp_path_factory) -> Iterator[Clamd]:
    yield from run_clamd(tmp_path_factory)

pytestmark = pytest.mark.timeout(60)

def scan(data: bytes, **kw) -> ClamdResult:
    return asyncio.run(clamd_scan(data, **kw))


def mail_with_eicar_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.org", "b@example.net", "test"
    msg.set_content("see attached\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.com")
    return msg.as_bytes(policy=SMTP)


# --- with the real clamd -------------------------------------------------------------------------------

def test_clamd_starts_quickly_and_answers_ping_on_both_sockets(clamd: Clamd) -> None:
    print(f"clamd answered PING {clamd.start_seconds:.2f} s after start")
    assert clamd.start_seconds < 20
    assert asyncio.run(clamd_ping(**clamd.unix))
    assert asyncio.run(clamd_ping(**clamd.tcp))
    assert asyncio.run(clamd_version(**clamd.unix)).startswith("ClamAV ")


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_eicar_is_found(clamd: Clamd, where: str) -> None:
    result = scan(EICAR + b"\r\n", **getattr(clamd, where))
    assert result == ClamdResult(True, FOUND_NAME, f"stream: {FOUND_NAME} FOUND")


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_clean_data_is_ok(clamd: Clamd, where: str) -> None:
    assert scan(b"hello, world\r\n" * 1000, **getattr(clamd, where)) == ClamdResult(False, None, "stream: OK")


def test_empty_stream_is_ok(clamd: Clamd) -> None:
    assert scan(b"", **clamd.unix) == ClamdResult(False, None, "stream: OK")


def test_eicar_split_over_tiny_chunks_is_found(clamd: Clamd) -> None:
    data = os.urandom(1000) + EICAR + os.urandom(1000)
    assert scan(data, chunk_size=7, **clamd.tcp).name == FOUND_NAME


def test_eicar_in_a_base64_mail_attachment_is_found(clamd: Clamd) -> None:
    data = mail_with_eicar_attachment()
    assert EICAR not in data
    assert scan(data, **clamd.unix).name == FOUND_NAME


def test_stream_over_stream_max_length_raises_and_clamd_stays_up(clamd: Clamd) -> None:
    for where in (clamd.unix, clamd.tcp):
        with pytest.raises(ClamdScanError) as info:
            scan(b"x" * (2 * STREAM_MAX_BYTES), **where)
        assert "INSTREAM size limit exceeded" in str(info.value)
        assert info.value.transient is False
    assert scan(EICAR, **clamd.unix).infected


def test_concurrent_scans(clamd: Clamd) -> None:
    async def many() -> list[ClamdResult]:
        return await asyncio.gather(*(clamd_scan(EICAR if i % 2 else b"clean %d" % i, **clamd.unix)
                                      for i in range(20)))
    results = asyncio.run(many())
    assert [r.infected for r in results] == [bool(i % 2) for i in range(20)]


# --- failure paths, with small servers of our own ------------------------------------------------------

def test_nothing_listening_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ClamdUnavailable):
        scan(EICAR, unix_path=str(tmp_path / "missing.sock"))
    with pytest.raises(ClamdUnavailable):
        scan(EICAR, host="127.0.0.1", port=free_port())
    assert asyncio.run(clamd_ping(unix_path=str(tmp_path / "missing.sock"))) is False


def test_silence_is_a_timeout(tmp_path: Path) -> None:
    async def silent(reader, writer):
        await reader.read()         # takes everything, answers nothing

    began = time.monotonic()
    with pytest.raises(ClamdTimeout):
        run_against(silent, tmp_path, lambda path: clamd_scan(EICAR, unix_path=path, timeout=0.3))
    assert time.monotonic() - began < 5
    assert run_against(silent, tmp_path, lambda path: clamd_ping(unix_path=path, timeout=0.3)) is False


def test_a_peer_that_stops_reading_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    async def deaf(reader, writer):
        await asyncio.sleep(30)     # reads nothing: our send buffer fills and stays full

    began = time.monotonic()
    with pytest.raises(ClamdTimeout):
        run_against(deaf, tmp_path, lambda path: clamd_scan(b"x" * (16 * 1024 * 1024), unix_path=path, timeout=0.3))
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("reply", [b"220 mail.example ESMTP\r\n", b"stream: maybe\0", b"x" * 10_000])
def test_a_reply_that_is_not_clamd_is_a_protocol_error(tmp_path: Path, reply: bytes) -> None:
    async def liar(reader, writer):
        await reader.readexactly(len(b"zINSTREAM\0") + 4 + len(EICAR) + 4)
        writer.write(reply)
        await writer.drain()
        writer.close()

    with pytest.raises(ClamdProtocolError):
        run_against(liar, tmp_path, lambda path: clamd_scan(EICAR, unix_path=path, timeout=5))


def test_closed_without_a_reply_is_unavailable(tmp_path: Path) -> None:
    async def closer(reader, writer):
        writer.close()

    with pytest.raises(ClamdUnavailable):
        run_against(closer, tmp_path, lambda path: clamd_scan(EICAR * 10_000, unix_path=path, timeout=5))


def test_arguments_must_name_one_socket() -> None:
    with pytest.raises(ValueError):
        scan(EICAR)
    with pytest.raises(ValueError):
        scan(EICAR, unix_path="/x", host="127.0.0.1")


@pytest.mark.parametrize("reply, expected", [
    ("stream: OK", ClamdResult(False, None, "stream: OK")),
    ("stream: Win.Test.EICAR_HDB-1 FOUND", ClamdResult(True, "Win.Test.EICAR_HDB-1", "stream: Win.Test.EICAR_HDB-1 FOUND")),
    ("1: stream: OK", ClamdResult(False, None, "1: stream: OK")),
])
def test_scan_replies(reply: str, expected: ClamdResult) -> None:
    assert parse_scan_reply(reply) == expected


@pytest.mark.parametrize("reply, transient", [("INSTREAM size limit exceeded. ERROR", False),
                                              ("Can't allocate memory ERROR", True)])
def test_error_replies(reply: str, transient: bool) -> None:
    with pytest.raises(ClamdScanError) as info:
        parse_scan_reply(reply)
    assert info.value.transient is transient and info.value.reply == reply
