"""Per-session bounds: many slow clients, trickled commands, messages per session; vipd stays prompt."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time

from support import Lab, pool_config, wait_for


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_200_slow_clients_do_not_hold_up_a_normal_one(lab: Lab) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(pool_config(sink))
    pid = vipd.proc.popen.pid
    before = rss_kib(pid)
    started = asyncio.Event()
    results: dict[str, float] = {}

    async def slow(index: int, stop: asyncio.Event) -> None:
        # Each from its own loopback address (as from 200 hosts), one byte a second, never a full line.
        source = f"127.0.{1 + index // 250}.{2 + index % 250}"
        reader, writer = await asyncio.open_connection("127.0.0.1", vipd.port(), local_addr=(source, 0))
        await reader.readline()
        try:
            for byte in b"EHLO slow.example.but.never.finished.because.it.is.very.long":
                if stop.is_set():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(slow(i, stop)) for i in range(200)]
        await asyncio.sleep(3)                      # all 200 connected and trickling
        started.set()
        t0 = time.monotonic()
        await asyncio.to_thread(_deliver, vipd.port())
        results["normal"] = time.monotonic() - t0
        results["rss_during"] = rss_kib(pid)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    print(f"normal client: {results['normal'] * 1000:.0f} ms among 200 slow ones; "
          f"vipd RSS {before} KiB before, {results['rss_during']:.0f} KiB with them")
    assert results["normal"] < 5.0                  # generous: it takes milliseconds when quiet
    assert results["rss_during"] - before < 64 * 1024   # bounded: well under 64 MiB for 200 sessions
    assert wait_for(lambda: sink.messages(), what="the normal client's message")


def _deliver(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        s.sendmail("a@example.org", ["b@example.com"], b"Subject: prompt\r\n\r\nnot held up\r\n")


def test_a_trickled_command_does_not_extend_the_command_timeout(lab: Lab) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(pool_config(sink, extra_vip="command_timeout_seconds = 2"))
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        t0 = time.monotonic()
        out = b""
        sock.settimeout(0.3)
        for byte in b"EHLO trickle.example.with.a.very.long.name.indeed":
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            out += chunk
            if not chunk or b"421" in out:
                break
        elapsed = time.monotonic() - t0
    assert b"421 4.4.2" in out, out
    assert elapsed < 8                                # about the 2 s timeout plus a sweep, not 15 s of bytes


def test_max_messages_per_session(lab: Lab) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(pool_config(sink, extra_vip="max_messages_per_session = 2"))
    with smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.test", timeout=30) as s:
        for n in range(2):
            s.sendmail("a@example.org", ["b@example.com"], f"Subject: {n}\r\n\r\nx\r\n".encode())
        code, text = s.mail("a@example.org")
        assert (code, text[:5]) == (421, b"4.7.0")
    assert len(wait_for(lambda: len(sink.messages()) == 2 and sink.messages())) == 2
