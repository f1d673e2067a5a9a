"""``python -m backends.sendmail``: run one sendmail instance by hand until Ctrl-C or SIGTERM, or print its .mc.

    python -m backends.sendmail --role incoming --port 2525 --dir /srv/vipd/mx1 \\
        --smart-host 127.0.0.1:2526 --relay-domain example.com --access 'From:spammer@bad.example REJECT'
    python -m backends.sendmail --role delivery --port 0 --dir /srv/vipd/dl1 \\
        --mailertable example.com=127.0.0.1:2600 --smart-host 127.0.0.1:2601
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .instance import SendmailError, SendmailInstance, SendmailUnavailable, free_port
from .mc import PAPER_BANNER, ROLES, SettingsError, render_mc

__all__ = ["build_parser", "main"]


def _pair(separator: str):
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.strip().partition(separator)
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: expected KEY{separator}VALUE")
        return key.strip(), value.strip()
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends.sendmail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--port", type=int, required=True, help="port to listen on; 0: a free one")
    p.add_argument("--dir", type=Path, required=True, help="instance folder (created; files in it are replaced)")
    p.add_argument("--listen-address", default="127.0.0.1")
    p.add_argument("--hostname", default="mta.vipd.test", help="the instance's own name (needs a dot)")
    p.add_argument("--smart-host", help="HOST:PORT that gets all mail (incoming, content) or the rest (delivery)")
    p.add_argument("--relay-domain", action="append", default=[], help="accept mail for DOMAIN (repeatable)")
    p.add_argument("--relay-client", action="append", default=[],
                   help="let clients matching this access-map prefix relay, e.g. 10.1 (repeatable)")
    p.add_argument("--access", action="append", default=[], type=_pair(" "),
                   help="access map entry 'KEY ACTION', e.g. 'From:spammer@bad.example REJECT' (repeatable)")
    p.add_argument("--mailertable", action="append", default=[], type=_pair("="),
                   help="DOMAIN=HOST:PORT route (delivery role; repeatable)")
    p.add_argument("--dnsbl", action="append", default=[], help="DNSBL zone (repeatable)")
    p.add_argument("--host", action="append", default=[], type=_pair("="),
                   help="NAME=ADDRESS in the instance's hosts file, e.g. a sender domain (repeatable)")
    p.add_argument("--dns-server", help="nameserver on port 53 for DNSBL and MX lookups; default: no DNS")
    p.add_argument("--banner", default=PAPER_BANNER)
    p.add_argument("--max-message-bytes", type=int, default=4_194_304)
    p.add_argument("--run-as-user", default="mail", help="user the daemon runs as after start; 'root' to stay")
    p.add_argument("--queue-interval-seconds", type=int, default=10)
    p.add_argument("--log-level", type=int, default=9)
    p.add_argument("--trace", action="store_true", help="record every SMTP dialogue in DIR/traffic.log (-X)")
    p.add_argument("--print-mc", action="store_true", help="print the .mc and exit without starting anything")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    port = args.port or free_port(args.listen_address)
    try:
        instance = SendmailInstance(
            args.dir, args.role, port, queue_interval_seconds=args.queue_interval_seconds, trace=args.trace,
            listen_address=args.listen_address, hostname=args.hostname, smart_host=args.smart_host,
            relay_domains=args.relay_domain, relay_clients=args.relay_client, access=args.access,
            mailertable=args.mailertable, dnsbl_zones=args.dnsbl, hosts=args.host, dns_server=args.dns_server,
            banner=args.banner, max_message_bytes=args.max_message_bytes, log_level=args.log_level,
            run_as_user=None if args.run_as_user == "root" else args.run_as_user)
    except (SettingsError, SendmailError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_mc:
        print(render_mc(instance.settings), end="")
        return 0
    stopping = threading.Event()
    # SIGTERM takes the same clean way out as Ctrl-C: stop sendmail by PID, then exit.
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        instance.start()
    except (SendmailUnavailable, SendmailError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"listening on {instance.address} role={args.role} pid={instance.daemon_pid} "
              f"start_seconds={instance.timings['start_seconds']:.3f} maillog={instance.maillog}", flush=True)
        stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        instance.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
