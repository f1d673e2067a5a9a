"""``vipctl``: show and change a running vipd over its admin API.

It finds the admin listener from ``--admin URL`` or from the ``[admin]`` table of ``--config FILE``
(and the token from ``--token``, ``$VIPD_ADMIN_TOKEN`` or that table). Commands:

    show [--json]                               VIPs, pools and servers
    metrics                                     the Prometheus text
    server drain|ready|maint POOL/SERVER        the operator's state of a server
    server weight POOL/SERVER N|config          a runtime weight, or back to the configured one
    pool hold|release POOL                      the shut-off valve: nothing is sent to a held pool
    queue list [--pool P] [--json]              the failover queue, like mailq
    queue show ID [--json]                      one message: envelope, state, headers
    queue flush [POOL]                          try every (or one pool's) queued message now
    queue hold|release|delete|bounce ID         one message

Exit status: 0 done, 1 the daemon refused or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["main", "render_status"]


class Failed(Exception):
    """What to print before exiting with status 1."""


def _admin(args: argparse.Namespace) -> tuple[str, str | None]:
    token = args.token or os.environ.get("VIPD_ADMIN_TOKEN") or None
    if args.admin:
        return args.admin.rstrip("/"), token
    if args.config:
        from . import config
        try:
            cfg = config.load(Path(args.config))
        except config.ConfigError as exc:
            raise Failed("\n".join(exc.errors)) from None
        if cfg.admin is None:
            raise Failed(f"{args.config}: no [admin] table, so no admin listener to talk to")
        ep = cfg.admin.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(ep.host, ep.host)
        url = f"http://[{host}]:{ep.port}" if ":" in host else f"http://{host}:{ep.port}"
        return url, token or cfg.admin.token
    raise Failed("give --admin URL or --config FILE")


def _call(base: str, token: str | None, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise Failed(f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Failed(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from None


def _target(text: str) -> tuple[str, str]:
    pool, sep, server = text.partition("/")
    if not sep or not pool or not server:
        raise argparse.ArgumentTypeError(f"expected POOL/SERVER, got {text!r}")
    return pool, server


def _quote(part: str) -> str:
    return urllib.request.quote(part, safe="")


# --- the table for people ------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _check(server: dict[str, Any]) -> str:
    check = server.get("check")
    if not check:
        return "-"
    verdict = "ok" if check["ok"] else "FAILED"
    return f"{verdict} {check['detail']} ({check['duration_seconds'] * 1000:.1f} ms, {check['age_seconds']:.0f}s ago)"


def render_status(doc: dict[str, Any]) -> str:
    out = [f"vipd {doc['version']} on {doc['hostname']}, up {_duration(doc['uptime_seconds'])}, "
           f"{doc['workers']} worker{'s' if doc['workers'] != 1 else ''}", ""]
    rows = [["VIP", "LISTEN", "SESSIONS", "DEFAULT POOL"]]
    for v in doc["vips"]:
        rows.append([v["name"], " ".join(v["listen"]) or "-", f"{v['sessions']}/{v['max_sessions']}",
                     v["default_pool"]])
    out += _table(rows)
    for p in doc["pools"]:
        held = "  HELD" + (f" for {_duration(p['held_seconds'])}" if p.get("held_seconds") is not None else "") \
            if p["held"] else ""
        out += ["", f"pool {p['name']} ({p['balance']}): {p['usable']}/{len(p['servers'])} usable{held}"]
        rows = [["SERVER", "ADDRESS", "STATE", "ADMIN", "HEALTH", "AGENT", "WEIGHT", "EFFECTIVE", "ACTIVE",
                 "PICKED", "IDLE", "SINCE", "LAST CHECK"]]
        for s in p["servers"]:
            name = s["name"] + (" (backup)" if s["backup"] else "")
            rows.append([name, s["address"], s["state"].upper(), s["admin"], s["health"], s["agent"] or "-",
                         str(s["weight"]), f"{s['effective_weight']:g}", str(s["active"]),
                         str(s["selected"]), str(s["idle"]), _duration(s["changed_seconds"]), _check(s)])
        out += ["  " + line for line in _table(rows)]
    return "\n".join(out) + "\n"


# --- commands ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vipctl", description="show and change a running vipd")
    parser.add_argument("--admin", help="admin listener URL, e.g. http://127.0.0.1:9025")
    parser.add_argument("--config", "-c", help="vipd config file (its [admin] table is used)")
    parser.add_argument("--token", help="the admin API token (default: $VIPD_ADMIN_TOKEN, then the config)")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="VIPs, pools and servers with their state")
    show.add_argument("--json", action="store_true", help="the API's JSON, for scripts")
    sub.add_parser("metrics", help="the Prometheus metrics text")
    server = sub.add_parser("server", help="change one server").add_subparsers(dest="action", required=True)
    for action, text in (("drain", "finish current transactions, take no new ones"),
                         ("ready", "back in service"), ("maint", "out of service for maintenance")):
        server.add_parser(action, help=text).add_argument("target", type=_target, metavar="POOL/SERVER")
    weight = server.add_parser("weight", help="set a runtime weight (or 'config')")
    weight.add_argument("target", type=_target, metavar="POOL/SERVER")
    weight.add_argument("weight", help="0..256, or 'config' for the configured weight")
    pool = sub.add_parser("pool", help="hold or release a whole pool").add_subparsers(dest="action", required=True)
    for action, text in (("hold", "send nothing to this pool (the shut-off valve)"), ("release", "send again")):
        pool.add_parser(action, help=text).add_argument("pool")
    queue = sub.add_parser("queue", help="the failover queue").add_subparsers(dest="action", required=True)
    listing = queue.add_parser("list", help="every queued message, like mailq")
    listing.add_argument("--pool")
    listing.add_argument("--json", action="store_true")
    show_one = queue.add_parser("show", help="one queued message")
    show_one.add_argument("id")
    show_one.add_argument("--json", action="store_true")
    queue.add_parser("flush", help="try queued messages now").add_argument("pool", nargs="?")
    for action, text in (("hold", "keep a message from delivery"), ("release", "let a held message go"),
                         ("delete", "remove a message without notice"),
                         ("bounce", "return a message to its sender now")):
        queue.add_parser(action, help=text).add_argument("id")
    return parser


def render_queue(doc: dict[str, Any]) -> str:
    if not doc["messages"]:
        return "queue is empty\n"
    rows = [["ID", "SIZE", "AGE", "POOL", "TRIES", "SENDER", "RECIPIENTS"]]
    notes: dict[int, str] = {}
    for m in doc["messages"]:
        flag = "!" if m["held"] else ("*" if m["delivering"] else "")
        rows.append([m["id"] + flag, str(m["size"]), _duration(m["age_seconds"]), m["pool"], str(m["attempts"]),
                     f"<{m['sender']}>", ", ".join(m["recipients"])])
        if m["last_error"]:
            notes[len(rows) - 1] = f"    ({m['last_error']})"
    out = []
    for i, line in enumerate(_table(rows)):
        out.append(line)
        if i in notes:
            out.append(notes[i])
    out.append(f"-- {doc['count']} message{'s' if doc['count'] != 1 else ''}, {doc['bytes']} bytes "
               "(! held, * being delivered)")
    return "\n".join(out) + "\n"


def _queue(args: argparse.Namespace, base: str, token: str | None) -> str:
    if args.action == "list":
        query = f"?pool={_quote(args.pool)}" if args.pool else ""
        raw = _call(base, token, f"/api/queue{query}")
        return raw.decode() + "\n" if args.json else render_queue(json.loads(raw))
    if args.action == "show":
        raw = _call(base, token, f"/api/queue/{_quote(args.id)}")
        if args.json:
            return raw.decode() + "\n"
        doc = json.loads(raw)
        head = [f"{k}: {doc.get(k)}" for k in ("id", "pool", "sender", "recipients", "size", "age_seconds",
                                               "attempts", "last_error", "held", "client", "helo")]
        return "\n".join(head) + "\n\n" + doc.get("headers", "") + "\n"
    if args.action == "flush":
        doc = json.loads(_call(base, token, "/api/queue/flush", {"pool": args.pool}))
        if doc["flushed"] is None:                   # several workers: each flushes its own
            return "queue flush: requested\n"
        return f"queue flush: {doc['flushed']} message(s) due now\n"
    doc = json.loads(_call(base, token, f"/api/queue/{_quote(args.id)}", {"action": args.action}))
    return f"queue {doc['id']}: {doc['result']}\n"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    base, token = _admin(args)
    if args.command == "show":
        raw = _call(base, token, "/api/status")
        return raw.decode() + "\n" if args.json else render_status(json.loads(raw))
    if args.command == "metrics":
        return _call(base, token, "/metrics").decode()
    if args.command == "queue":
        return _queue(args, base, token)
    if args.command == "pool":
        held = args.action == "hold"
        doc = json.loads(_call(base, token, f"/api/pools/{_quote(args.pool)}", {"held": held}))
        return f"pool {doc['name']}: {'held' if doc['held'] else 'released'}\n"
    pool_name, server_name = args.target
    if args.action == "weight":
        if args.weight == "config":
            body: dict[str, Any] = {"weight": None}
        elif args.weight.isdigit():
            body = {"weight": int(args.weight)}
        else:
            parser.error(f"weight must be 0..256 or 'config', got {args.weight!r}")
    else:
        body = {"admin": args.action}
    doc = json.loads(_call(base, token, f"/api/pools/{_quote(pool_name)}/servers/{_quote(server_name)}", body))
    return (f"server {pool_name}/{doc['name']}: {doc['state']} (admin {doc['admin']}, weight {doc['weight']}, "
            f"effective {doc['effective_weight']:g}, {doc['active']} active)\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(run(args, parser))
    except Failed as exc:
        print(f"vipctl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
