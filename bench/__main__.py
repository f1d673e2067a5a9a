"""The bench's command line (see bench/README.md).

    python -m bench compare [--smoke] [--repeats N] [--systems a,b] [--loads 1k-s1-one,...] [--results DIR]
    python -m bench micro [--seconds S] [--repeats N] [--results DIR]
    python -m bench idle [--sessions N] [--repeats N] [--results DIR]
    python -m bench list

Exit status: 0 when every measurement succeeded, 1 when one failed (the reports are written all the
same), 2 when the bench itself cannot run here (no smtp-source, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .compare import DEFAULT_CACHE, DEFAULT_RESULTS, Options, run_compare, select_systems
from .idle import DEFAULT_SESSIONS, meta, run_idle
from .loads import LOADS, SMOKE_LOAD, Load
from .micro import run_micro
from .report import idle_table, markdown, micro_table
from .system import Unavailable


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _loads(text: str) -> list[Load]:
    try:
        return LOADS if text == "all" else [Load.parse(name) for name in _names(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="vipd benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="vipd, the baseline and the peers side by side")
    compare.add_argument("--smoke", action="store_true",
                         help=f"CI check: baseline and vipd-1w, load {SMOKE_LOAD.name}, 1 repeat, 1 s runs, "
                              "no idle-session measurement")
    compare.add_argument("--repeats", type=int, help="measurements per system and load, and of the idle "
                                                     "sessions (default 3)")
    compare.add_argument("--systems", type=_names, help="comma-separated names (default: all); baseline always runs")
    compare.add_argument("--loads", type=_loads, help="comma-separated load names, or 'all' (the default)")
    compare.add_argument("--seconds", type=float, help="target length of one measurement (default 3)")
    compare.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="output folder (default bench/results)")
    compare.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloads kept between runs")
    compare.add_argument("--keep-workdirs", action="store_true", help="keep each system's files (logs, configs)")
    micro = sub.add_parser("micro", help="the protocol core alone: commands/s and DATA MB/s")
    micro.add_argument("--seconds", type=float, default=1.0, help="length of one timed loop (default 1)")
    micro.add_argument("--repeats", type=int, default=3, help="loops per figure (default 3)")
    micro.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="writes micro.json here")
    idle = sub.add_parser("idle", help="vipd's memory per idle session (VmRSS before and after opening them)")
    idle.add_argument("--sessions", type=_positive, default=DEFAULT_SESSIONS,
                      help=f"client connections held open (default {DEFAULT_SESSIONS})")
    idle.add_argument("--repeats", type=_positive, default=3,
                      help="measurements, vipd started afresh for each (default 3)")
    idle.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="writes idle.json here")
    sub.add_parser("list", help="the loads and the systems")
    return parser


def _compare_options(args: argparse.Namespace) -> Options:
    smoke = args.smoke
    return Options(
        loads=args.loads or ([SMOKE_LOAD] if smoke else LOADS),
        repeats=args.repeats or (1 if smoke else 3),
        seconds=args.seconds or (1.0 if smoke else 3.0),
        results=args.results,
        cache=args.cache,
        systems=args.systems or (["baseline", "vipd-1w"] if smoke else None),
        micro_seconds=0.2 if smoke else 1.0,
        micro_repeats=1 if smoke else 3,
        keep_workdirs=args.keep_workdirs,
        command="compare --smoke" if smoke else "compare",
        idle=not smoke,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        results = run_compare(_compare_options(args))
    except (Unavailable, ValueError) as exc:
        print(f"bench: cannot run: {exc}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"bench: results in {args.results}", file=sys.stderr)
    idle_failed = results.idle is not None and bool(results.idle.errors)
    return 0 if all(s.ok for s in results.samples) and not idle_failed else 1


def cmd_micro(args: argparse.Namespace) -> int:
    result = run_micro(args.seconds, args.repeats)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "micro.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(micro_table(result))
    return 0


def cmd_idle(args: argparse.Namespace) -> int:
    about = meta()
    result = run_idle(args.sessions, args.repeats)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "idle.json").write_text(json.dumps({"meta": about, **result.to_json()}, indent=2) + "\n")
    print(idle_table(result))
    return 1 if result.errors else 0


def cmd_list(args: argparse.Namespace) -> int:
    systems, unavailable = select_systems(None)
    print("loads:", ", ".join(load.name for load in LOADS), f"(smoke: {SMOKE_LOAD.name})")
    for system in systems:
        print(f"{system.name:12} {system.description}")
    for name, reason in unavailable.items():
        print(f"{name:12} {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"compare": cmd_compare, "micro": cmd_micro, "idle": cmd_idle, "list": cmd_list}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
