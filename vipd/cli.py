"""The ``vipd`` command: ``run`` the daemon, ``check-config`` a file, start the ``lab``.

uvloop is installed here and only here (STYLE.md section 5): library code runs on any loop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

__all__ = ["main"]


def _loop_policy(use_uvloop: bool) -> None:
    if not use_uvloop:
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency, but never fatal
        print("vipd: warning: uvloop not installed, using asyncio's loop", file=sys.stderr)
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_check_config(args: argparse.Namespace) -> int:
    from . import config
    errors = config.check(Path(args.file))
    for err in errors:
        print(err, file=sys.stderr)
    if errors:
        print(f"{args.file}: {len(errors)} error{'s' if len(errors) != 1 else ''}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import config
    from .net.daemon import Daemon
    try:
        cfg = config.load(Path(args.config))
    except config.ConfigError as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return 1
    _loop_policy(not args.no_uvloop)
    if cfg.workers > 1:
        from .net.workers import run_supervisor
        return run_supervisor(cfg)

    async def main() -> None:
        await Daemon(cfg).run()

    asyncio.run(main())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One of several workers, started by the supervisor with its listening sockets."""
    from . import config
    from .log import LogBuffer
    from .metrics import Metrics
    from .net.daemon import Daemon
    from .net.workers import parse_fd_args
    cfg = config.load(Path(args.config))
    _loop_policy(True)
    sockets = parse_fd_args(args.fd)

    async def main() -> None:
        log = LogBuffer(level=cfg.log_level, name=f"vipd[{args.index}]")
        await Daemon(cfg, log, Metrics(health=False), worker=args.index, listen_sockets=sockets,
                     parent=args.parent, run_dir=Path(args.run_dir)).run()

    asyncio.run(main())
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    if args.scenario:
        _loop_policy(not args.no_uvloop)
        from .lab_scenarios import run_scenario_lab
        return run_scenario_lab(args.scenario, Path(args.dir) if args.dir else None, args.once, args.backends,
                                args.write_config)
    from .lab import run_lab
    _loop_policy(not args.no_uvloop)
    return run_lab(port=args.port, workdir=Path(args.dir) if args.dir else None,
                   once=args.once)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vipd", description="Layer-7 SMTP load balancer")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground (logs to stderr)")
    run.add_argument("--config", "-c", required=True, help="TOML configuration file")
    run.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    run.set_defaults(func=cmd_run)
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--config", required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--parent", type=int, required=True)
    worker.add_argument("--fd", action="append", default=[])
    worker.add_argument("--run-dir", required=True)
    worker.set_defaults(func=cmd_worker)
    check = sub.add_parser("check-config", help="validate a configuration file; lists every error")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    lab = sub.add_parser("lab", help="a VIP on loopback before two sink backends, with a sample message")
    lab.add_argument("scenario", nargs="?", help="scenario1, scenario2 or scenario3 (the email DMZ's designs, "
                                                 "conf/SCENARIO/topology.toml); none: one VIP before two sinks")
    lab.add_argument("--backends", choices=["python", "sendmail"], default="python")
    lab.add_argument("--port", type=int, default=2525, help="VIP port (default 2525; any free port if taken)")
    lab.add_argument("--dir", help="working folder (default: a new temporary one)")
    lab.add_argument("--once", action="store_true", help="send the sample, show it, and stop")
    lab.add_argument("--write-config", action="store_true",
                     help="write conf/SCENARIO/vipd.toml from its topology.toml (the reference addresses) and stop")
    lab.add_argument("--no-uvloop", action="store_true")
    lab.set_defaults(func=cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
