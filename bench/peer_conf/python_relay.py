"""A plain Python SMTP relay for the bench: aiosmtpd receives, aiosmtplib forwards each message on a
new connection to the next sink (round robin), and the client gets the sink's answer.

    python python_relay.py --listen 127.0.0.1:0 --sink 127.0.0.1:2501 --sink 127.0.0.1:2502

Prints ``listening HOST:PORT`` once it accepts connections; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import aiosmtplib
from aiosmtpd.smtp import SMTP

HOSTNAME = "bench.vipd.test"


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Relay:
    def __init__(self, sinks: list[tuple[str, int]]) -> None:
        self._next = itertools.cycle(sinks)

    async def handle_DATA(self, server, session, envelope) -> str:
        host, port = next(self._next)
        try:
            await aiosmtplib.send(
                envelope.original_content, sender=envelope.mail_from, recipients=envelope.rcpt_tos,
                hostname=host, port=port, local_hostname=HOSTNAME, start_tls=False, timeout=60)
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError) as exc:
            return f"451 4.4.1 relay to {host}:{port} failed: {exc.__class__.__name__}"
        return "250 2.0.0 relayed"


async def serve(listen: tuple[str, int], sinks: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    handler = Relay(sinks)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, ident="python-relay", decode_data=False),
        listen[0], listen[1], backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=host_port, default=("127.0.0.1", 0))
    parser.add_argument("--sink", type=host_port, action="append", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.sink))


if __name__ == "__main__":
    main()
