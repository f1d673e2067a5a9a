"""smtp_check against real sink processes and hand-made servers; agent_check against ``python -m health.agent``."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from health.checks import agent_check, smtp_check

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def test_sink_is_healthy(lab):
    sink = lab.sink("a")
    result = asyncio.run(smtp_check("127.0.0.1", sink.port))
    assert result.ok, result.detail
    assert result.detail.startswith("EHLO 2")
    assert 0 <= result.duration_seconds < 5


def test_require_a_keyword_the_sink_lists(lab):
    sink = lab.sink("a")
    assert asyncio.run(smtp_check("127.0.0.1", sink.port, require="PIPELINING")).ok
    missing = asyncio.run(smtp_check("127.0.0.1", sink.port, require="NOPE"))
    assert not missing.ok
    assert "NOPE" in missing.detail


def test_nothing_listening_fails_quickly():
    with socket.socket() as held:             # bound, not listening: connections are refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        started = time.monotonic()
        result = asyncio.run(smtp_check("127.0.0.1", port, timeout=5.0))
    assert not result.ok
    assert time.monotonic() - started < 2


async def _with_server(handler: Handler, **check) -> tuple:
    """Run one smtp_check against an in-process server; return (result, lines the server got)."""
    got: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
            while line := await reader.readline():
                got.append(line)
        finally:
            writer.close()

    server = await asyncio.start_server(recording, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        return await smtp_check("127.0.0.1", port, **check), got
    finally:
        server.close()


def _greets(*lines: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(lines))
        await writer.drain()
    return handler


def test_554_greeting_is_unhealthy():
    result, got = asyncio.run(_with_server(_greets(b"554 no\r\n")))
    assert not result.ok
    assert "554" in result.detail
    assert got == []                           # no EHLO after a refusing greeting


def test_multiline_greeting_then_ehlo_quit():
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-first\r\n220-second\r\n220 ready\r\n")
        line = await reader.readline()
        assert line.startswith(b"EHLO health.vipd.test")
        writer.write(b"250-mx.test\r\n250-SIZE 10\r\n250 PIPELINING\r\n")
        assert await reader.readline() == b"QUIT\r\n"
        writer.write(b"221 bye\r\n")
        await writer.drain()

    result, _ = asyncio.run(_with_server(server, require="pipelining"))
    assert result.ok, result.detail


def test_ehlo_refused_is_unhealthy_and_still_quits():
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()
        writer.write(b"502 no EHLO here\r\n")
        assert await reader.readline() == b"QUIT\r\n"
        writer.write(b"221 bye\r\n")
        await writer.drain()

    result, _ = asyncio.run(_with_server(server))
    assert not result.ok
    assert "502" in result.detail


def test_server_that_ignores_quit_keeps_the_verdict():
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()
        writer.write(b"250 ok\r\n")
        await writer.drain()

    result, got = asyncio.run(_with_server(server, timeout=5.0))
    assert result.ok, result.detail
    assert result.duration_seconds < 3
    assert got == [b"QUIT\r\n"]


def test_silent_server_times_out():
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    started = time.monotonic()
    result, _ = asyncio.run(_with_server(server, timeout=0.3))
    assert not result.ok
    assert "timeout" in result.detail
    assert time.monotonic() - started < 2


# --- agent ----------------------------------------------------------------------------------------

def test_agent_reports_up_drain_down(lab):
    agent = lab.agent("agent", load=0.5)      # vipd-agent with --queue-load 8 --refuse-load 12
    up = asyncio.run(agent_check("127.0.0.1", agent.port))
    assert (up.state, up.weight_percent) == ("up", 93)      # 100 - ceil(99 * 0.5 / 8) = 100 - 7
    agent.set_load(9.0)
    drain = asyncio.run(agent_check("127.0.0.1", agent.port))
    assert (drain.admin, drain.operational, drain.weight_percent, drain.raw) == ("drain", "up", None, "drain up")
    agent.set_load(20)
    assert asyncio.run(agent_check("127.0.0.1", agent.port)).state == "down"


def test_agent_unreadable_file_gives_no_state_and_sigterm_stops_it(lab):
    agent = lab.agent("agent", load=1.0)
    agent.load_file.unlink()
    report = asyncio.run(agent_check("127.0.0.1", agent.port))
    assert report.state is None and report.raw.startswith("#")
    agent.proc.signal(signal.SIGTERM)
    assert agent.proc.popen.wait(10) == 0


def test_agent_check_unreachable_raises():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            asyncio.run(agent_check("127.0.0.1", held.getsockname()[1], timeout=1.0))
