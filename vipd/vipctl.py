"""``vipctl``: talk to a running vipd over its admin listener.

It finds the listener from ``--admin URL`` or from the ``[admin]`` table of ``--config FILE``.
Commands now: ``show`` (VIPs, pools, servers) and ``metrics`` (the Prometheus text).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["main"]


def _admin_url(args: argparse.Namespace) -> str:
    if args.admin:
        return args.admin.rstrip("/")
    if args.config:
        from . import config
        cfg = config.load(Path(args.config))
        if cfg.admin is None:
            raise SystemExit(f"vipctl: {args.config}: no [admin] table, so no admin listener to talk to")
        ep = cfg.admin.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(ep.host, ep.host)
        return f"http://[{host}]:{ep.port}" if ":" in host else f"http://{host}:{ep.port}"
    raise SystemExit("vipctl: give --admin URL or --config FILE")


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"vipctl: cannot reach {url}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipctl", description="control a running vipd")
    parser.add_argument("--admin", help="admin listener URL, e.g. http://127.0.0.1:9025")
    parser.add_argument("--config", "-c", help="vipd config file (its [admin] table is used)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="VIPs, pools and servers with their state")
    sub.add_parser("metrics", help="the Prometheus metrics text")
    args = parser.parse_args(argv)
    base = _admin_url(args)
    path = {"show": "/", "metrics": "/metrics"}[args.command]
    sys.stdout.write(_get(base + path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
