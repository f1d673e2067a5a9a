"""``python -m backends.relay``: an SMTP backend that forwards every message to a next hop.

In-line, not store-and-forward: the client hears ``250`` only after the next hop said ``250`` for
every recipient, and otherwise gets the next hop's own reply (or 451 when it cannot be reached), so
the relay never holds mail and never loses any. The layers of the email DMZ (incoming, content,
delivery) chain relays like this one. The next-hop client is aiosmtplib: this is not vipd's hot
path, and aiosmtplib's ``sendmail`` does the whole client dialogue correctly.
"""

from __future__ import annotations

import argparse
import email.utils
import ipaddress
import sys

import aiosmtplib

from vipd.smtp import replies
from vipd.smtp.client import split_status
from vipd.smtp.replies import Reply

from .smtpd import App, Envelope, parse_listen, run_forever

__all__ = ["RelayApp", "main"]


class RelayApp(App):
    def __init__(self, next_hop: str, *, hostname: str, xclient_from: tuple = (),
                 timeout: float = 60.0, quiet: bool = False) -> None:
        self.next_host, self.next_port = parse_listen(next_hop)
        self.hostname = hostname
        self.xclient_from = xclient_from
        self.timeout = timeout
        self.quiet = quiet

    async def message(self, env: Envelope, body: bytes) -> Reply:  # type: ignore[override]
        trace = (f"Received: from {env.helo or 'unknown'} ([{env.client_ip}])\r\n"
                 f"\tby {self.hostname} (vipd relay backend) with ESMTP;\r\n"
                 f"\t{email.utils.formatdate(localtime=True)}\r\n").encode()
        try:
            errors, text = await aiosmtplib.send(
                trace + body, sender=env.sender or "", recipients=env.recipients,
                hostname=self.next_host, port=self.next_port, local_hostname=self.hostname,
                timeout=self.timeout, start_tls=False, use_tls=False)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return split_status(first.code, [first.message])
        except aiosmtplib.SMTPResponseException as exc:
            return split_status(exc.code, [exc.message])
        except (aiosmtplib.SMTPException, OSError) as exc:
            return replies.NO_BACKEND.with_text(f"Next hop unavailable: {exc}")
        if errors:
            # Some recipients were refused after others were accepted: the client must retry them.
            return replies.LOCAL_ERROR.with_text("Next hop refused some recipients")
        reply = split_status(250, [text])
        if not self.quiet:
            print(f"relayed from=<{env.sender}> to={','.join(env.recipients)} "
                  f"next={self.next_host}:{self.next_port} reply=\"{reply}\"", flush=True)
        return reply


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends.relay", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--next", required=True, metavar="HOST:PORT", help="the next hop")
    p.add_argument("--hostname", default="relay.vipd.test")
    p.add_argument("--xclient-from", action="append", default=[], metavar="CIDR")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per next-hop step")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in args.xclient_from)
    app = RelayApp(args.next, hostname=args.hostname, xclient_from=nets, timeout=args.timeout,
                   quiet=args.quiet)
    run_forever(app, args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
