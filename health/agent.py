"""``python -m health.agent``: an HAProxy agent-check server that reports this host's load average.

On each connection it writes one line computed from the 1-minute load average (the first field of
``--loadavg-file``, read afresh every time) and closes:

* ``load >= refuse_load``              -> ``down``
* ``queue_load <= load < refuse_load`` -> ``drain up``
* ``load < queue_load``                -> ``ready up W%`` with ``W = 100 - ceil(99 * load / queue_load)``

so the weight is 100% at load 0 and falls linearly to 1% just below ``queue_load`` (never 0%, which
would drain the server). ``drain up`` rather than ``drain``: a server coming back from ``down``
through the drain band is working again, only not to be given new mail; HAProxy keeps the two apart
(and keeps ``drain`` until the agent says ``ready``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from pathlib import Path

__all__ = ["agent_reply", "main", "read_load", "serve"]


def agent_reply(load: float, queue_load: float, refuse_load: float) -> str:
    """The agent line (without newline) for a 1-minute load average; see the module docstring."""
    if not (0 < queue_load <= refuse_load) or math.isnan(load):
        raise ValueError(f"need 0 < queue_load <= refuse_load and a load, got {load=} {queue_load=} {refuse_load=}")
    if load >= refuse_load:
        return "down"
    if load >= queue_load:
        return "drain up"
    # "ready" too: in HAProxy "drain" is a sticky admin state that only "ready" lifts.
    return f"ready up {100 - math.ceil(99 * max(load, 0.0) / queue_load)}%"


def read_load(path: Path) -> float:
    """The 1-minute load average: the first field of a /proc/loadavg-format file."""
    return float(path.read_text().split()[0])


def reply_for(path: Path, queue_load: float, refuse_load: float) -> str:
    """The line to send now; a comment (no state word, so no change) if the file cannot be read."""
    try:
        return agent_reply(read_load(path), queue_load, refuse_load)
    except (OSError, ValueError, IndexError) as exc:
        print(f"cannot read load from {path}: {exc}", file=sys.stderr, flush=True)
        return "# load unknown"


async def serve(host: str, port: int, path: Path, queue_load: float, refuse_load: float) -> asyncio.Server:
    """Start the TCP server; each connection gets one line, then is closed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write((reply_for(path, queue_load, refuse_load) + "\n").encode("ascii"))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m health.agent", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, type=parse_listen, help="HOST:PORT (port 0: any free port)")
    p.add_argument("--loadavg-file", type=Path, default=Path("/proc/loadavg"))
    p.add_argument("--queue-load", type=float, default=8.0, help="drain at or above this load")
    p.add_argument("--refuse-load", type=float, default=12.0, help="down at or above this load")
    return p


async def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT."""
    host, port = args.listen
    server = await serve(host, port, args.loadavg_file, args.queue_load, args.refuse_load)
    bound = server.sockets[0].getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"listening on {shown}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.queue_load <= args.refuse_load:
        parser.error("need 0 < --queue-load <= --refuse-load")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
