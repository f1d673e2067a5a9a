"""``python -m backends.content``: the content-security layer's backend: scan, then relay on.

Each message is scanned before it is forwarded (in-line, like backends.relay: the client hears 250
only after the next hop's 250): by the built-in scanner (the EICAR test file in any MIME part; off
with ``--no-builtin``) and, when ``--clamd`` is given, by clamd over INSTREAM. An infected message
is refused with ``554 5.7.1``, or kept in ``--quarantine DIR`` and accepted (the sender is not
told), per configuration. A message that cannot be scanned (the scanner's limits, clamd down) is
deferred with ``451 4.7.0`` rather than passed unscanned: a security layer that fails open is no
layer.

Clean mail is then scored for spam when a scorer is configured (``--spamd ADDR`` or ``--spam-hook
module:function``, see backends.spam): ``--spam-action tag`` (the default) writes the verdict into
the header (``X-Spam-Flag``, ``X-Spam-Status``) and relays it, ``reject`` refuses spam with ``550
5.7.1``. Spam scoring fails open, unlike virus scanning: a score is a heuristic for the mailbox's
filters, not a barrier, and deferring all mail while spamd is down would turn a scorer's outage
into a mail outage (``--spam-unavailable defer`` when an operator wants the other way). Messages
larger than ``--spam-max-size`` are not scored, as spamc does not score them.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import time
from pathlib import Path

from vipd.smtp.replies import Reply

from vipd.routing import load_routes

from .clamd import ClamdError, clamd_scan
from .delivery import DeliveryApp, _hop
from .relay import RelayApp
from .scanner import scan_message
from .spam import Scorer, SpamResult, load_hook, score_with, spamd_scorer, status_line, tag
from .smtpd import App, Envelope, parse_service, run_forever

__all__ = ["ContentApp", "main"]

UNSCANNED = Reply(451, "4.7.0", "Message could not be scanned, try again later")
UNSCORED = Reply(451, "4.7.0", "Message could not be scored for spam, try again later")
# spamc's default: larger messages are passed on unscored.
SPAM_MAX_SIZE = 500 * 1024


def spam_refused(result: SpamResult) -> Reply:
    return Reply(550, "5.7.1", f"Message refused as spam (score {result.score:.1f}, required {result.threshold:.1f})")


class ContentApp(RelayApp):
    def __init__(self, next_hop: str | None, *, hostname: str, clamd: dict | None = None,
                 quarantine: Path | None = None, router: App | None = None, builtin: bool = True,
                 spam: Scorer | None = None, spam_action: str = "tag", spam_unavailable: str = "accept",
                 spam_max_size: int = SPAM_MAX_SIZE, **kw) -> None:
        """``router``: deliver by mailertable after scanning (a combined content + delivery layer)
        instead of relaying everything to ``next_hop``. ``clamd``: where clamd is (``parse_service``);
        ``spam``: score clean mail with this."""
        super().__init__(next_hop or "127.0.0.1:0", hostname=hostname, **kw)
        if spam_action not in ("tag", "reject") or spam_unavailable not in ("accept", "defer"):
            raise ValueError(f"spam_action {spam_action!r}, spam_unavailable {spam_unavailable!r}")
        self.clamd = clamd
        self.builtin = builtin
        self.quarantine = quarantine
        self.router = router
        self.spam = spam
        self.spam_action = spam_action
        self.spam_unavailable = spam_unavailable
        self.spam_max_size = spam_max_size

    def rcpt(self, env: Envelope, rcpt):  # type: ignore[override]
        return self.router.rcpt(env, rcpt) if self.router is not None else super().rcpt(env, rcpt)

    async def message(self, env: Envelope, body: bytes) -> Reply:  # type: ignore[override]
        found, error = await self.scan(body)
        if error is not None:
            self._say(env, "unscanned", error)
            return UNSCANNED
        if found is not None:
            self._say(env, "infected", found)
            if self.quarantine is not None:
                path = await asyncio.to_thread(self._keep, env, body)
                return Reply(250, "2.0.0", f"Ok: quarantined as {path.name}")
            return Reply(554, "5.7.1", f"Message refused: virus found: {found}")
        if self.spam is not None:
            scored = await self.score(env, body)
            if isinstance(scored, Reply):
                return scored
            body = scored
        if self.router is not None:
            return await self.router.message(env, body)  # type: ignore[misc]
        return await super().message(env, body)

    async def scan(self, body: bytes) -> tuple[str | None, str | None]:
        """(the name of what was found, or None; why it could not be scanned, or None)."""
        if self.builtin:
            verdict = scan_message(body)
            if verdict.infected:
                return verdict.name, None
            if verdict.error is not None:
                return None, verdict.error
        if self.clamd is None:
            return None, None
        try:
            result = await clamd_scan(body, **self.clamd)
        except ClamdError as exc:
            return None, f"clamd: {exc}"
        return (result.name, None) if result.infected else (None, None)

    async def score(self, env: Envelope, body: bytes) -> bytes | Reply:
        """The message to pass on (tagged when it was scored), or the reply that ends the transaction."""
        assert self.spam is not None
        if len(body) > self.spam_max_size:
            self._say(env, "spam-skipped", f"{len(body)} bytes is over {self.spam_max_size}")
            return body
        try:
            result = await score_with(self.spam, body)
        except Exception as exc:  # noqa: BLE001 - a hook may raise anything; the policy below decides
            self._say(env, "spam-unscored", f"{type(exc).__name__}: {exc}; {self.spam_unavailable}")
            return UNSCORED if self.spam_unavailable == "defer" else body
        self._say(env, "spam" if result.spam else "ham", status_line(result))
        if result.spam and self.spam_action == "reject":
            return spam_refused(result)
        return tag(body, result)

    def _keep(self, env: Envelope, body: bytes) -> Path:
        assert self.quarantine is not None
        self.quarantine.mkdir(parents=True, exist_ok=True)
        path = self.quarantine / f"{time.time_ns():x}-{os.getpid()}.eml"
        head = f"X-Quarantine-Sender: <{env.sender}>\r\nX-Quarantine-Recipients: {', '.join(env.recipients)}\r\n"
        path.write_bytes(head.encode() + body)
        return path

    def _say(self, env: Envelope, what: str, detail: str) -> None:
        if not self.quiet:
            print(f"{what} from=<{env.sender}> to={','.join(env.recipients)} client={env.client_ip} "
                  f"detail=\"{detail}\"", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends.content", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--next", metavar="HOST:PORT", help="the next hop (or route with --mailertable)")
    p.add_argument("--mailertable", type=Path, help="deliver by this mailertable after scanning")
    p.add_argument("--hop", action="append", type=_hop, default=[], metavar="NAME=HOST:PORT")
    p.add_argument("--hostname", default="content.vipd.test")
    p.add_argument("--clamd", metavar="unix:PATH|HOST:PORT", help="also scan with this clamd")
    p.add_argument("--builtin", action=argparse.BooleanOptionalAction, default=True,
                   help="scan with the built-in scanner (default: yes)")
    p.add_argument("--spamd", metavar="unix:PATH|HOST:PORT", help="score clean mail with this spamd")
    p.add_argument("--spam-hook", metavar="MODULE:FUNCTION", help="score clean mail with this function instead")
    p.add_argument("--spam-action", choices=("tag", "reject"), default="tag",
                   help="tag: add X-Spam-* headers and relay (default); reject: refuse spam with 550 5.7.1")
    p.add_argument("--spam-unavailable", choices=("accept", "defer"), default="accept",
                   help="when the scorer fails: accept unscored (default) or defer with 451 4.7.0")
    p.add_argument("--spam-max-size", type=int, default=SPAM_MAX_SIZE, metavar="BYTES",
                   help=f"do not score larger messages (default {SPAM_MAX_SIZE})")
    p.add_argument("--quarantine", type=Path, metavar="DIR", help="keep infected mail here and accept it")
    p.add_argument("--xclient-from", action="append", default=[], metavar="CIDR")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.next is None) == (args.mailertable is None):
        parser.error("give --next or --mailertable (with --hop)")
    if not args.builtin and args.clamd is None:
        parser.error("--no-builtin needs --clamd: a content-security layer that scans nothing is no layer")
    if args.spamd is not None and args.spam_hook is not None:
        parser.error("give --spamd or --spam-hook, not both")
    spam = clamd = None
    try:
        if args.clamd is not None:
            clamd = parse_service(args.clamd, "--clamd")
        if args.spamd is not None:
            spam = spamd_scorer(args.spamd, timeout=args.timeout)
        elif args.spam_hook is not None:
            spam = load_hook(args.spam_hook)
    except ValueError as exc:
        parser.error(str(exc))
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in args.xclient_from)
    router = None
    if args.mailertable is not None:
        try:
            router = DeliveryApp(load_routes(args.mailertable), dict(args.hop), hostname=args.hostname,
                                 timeout=args.timeout, quiet=args.quiet)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    app = ContentApp(args.next, hostname=args.hostname, clamd=clamd, quarantine=args.quarantine,
                     router=router, builtin=args.builtin, spam=spam, spam_action=args.spam_action,
                     spam_unavailable=args.spam_unavailable, spam_max_size=args.spam_max_size, xclient_from=nets,
                     timeout=args.timeout, quiet=args.quiet)
    run_forever(app, args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
