"""``python -m backends.delivery``: the delivery layer's backend: mailertable routing to next hops.

Each recipient domain is looked up in a sendmail-style mailertable (vipd.routing's semantics:
``example.com``, ``.example.com`` for subdomains, ``.`` for everything else) whose values name next
hops given with ``--hop NAME=HOST:PORT``: typically the internal gateway for the internal domains and
an outbound relay for the rest. One transaction goes to one next hop: a recipient for another hop
than the transaction's first gets ``452 4.5.3`` and the client sends it in a following transaction
(RFC 5321 4.5.3.1.10), so no message is ever half delivered. Forwarding is in-line, as in
backends.relay: the client hears 250 only after the next hop's 250.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from vipd.routing import RouteTable, load_routes
from vipd.smtp import replies
from vipd.smtp.commands import Address
from vipd.smtp.replies import Reply

from .relay import RelayApp
from .smtpd import App, Envelope, parse_listen, run_forever

__all__ = ["DeliveryApp", "main"]

OTHER_HOP = Reply(452, "4.5.3", "Recipient for another next hop: send it in a new transaction")
NO_ROUTE = Reply(550, "5.1.2", "No route to that domain")


class DeliveryApp(App):
    def __init__(self, routes: RouteTable, hops: dict[str, str], *, hostname: str, xclient_from: tuple = (),
                 timeout: float = 60.0, quiet: bool = False) -> None:
        unknown = routes.pools() - set(hops)
        if unknown:
            raise ValueError(f"the mailertable names hops not given with --hop: {', '.join(sorted(unknown))}")
        self.routes = routes
        self.hostname = hostname
        self.xclient_from = xclient_from
        self.relays = {name: RelayApp(address, hostname=hostname, timeout=timeout, quiet=quiet)
                       for name, address in hops.items()}

    def rcpt(self, env: Envelope, rcpt: Address) -> Reply:
        hop = self.routes.lookup(rcpt.domain)
        if hop is None:
            return NO_ROUTE
        if env.recipients and self.routes.lookup(_domain(env.recipients[0])) != hop:
            return OTHER_HOP
        return replies.RCPT_OK

    async def message(self, env: Envelope, body: bytes) -> Reply:  # type: ignore[override]
        hop = self.routes.lookup(_domain(env.recipients[0]))
        assert hop is not None, "rcpt() accepted only routable recipients"
        return await self.relays[hop].message(env, body)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _hop(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    parse_listen(address)
    return name, address


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends.delivery", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--mailertable", required=True, type=Path, help="domain -> hop name, sendmail syntax")
    p.add_argument("--hop", action="append", type=_hop, default=[], metavar="NAME=HOST:PORT")
    p.add_argument("--hostname", default="delivery.vipd.test")
    p.add_argument("--xclient-from", action="append", default=[], metavar="CIDR")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in args.xclient_from)
    try:
        app = DeliveryApp(load_routes(args.mailertable), dict(args.hop), hostname=args.hostname,
                          xclient_from=nets, timeout=args.timeout, quiet=args.quiet)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    run_forever(app, args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
