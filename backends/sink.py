"""``python -m backends.sink``: an SMTP backend that stores every message it accepts, one file each.

A stored file is one JSON line with the envelope, then the message exactly as received (after
dot-unstuffing). Files are written atomically: temp file, fsync, rename, fsync of the folder, so a
``250`` from the sink means the message is on disk. ``read_store(DIR)`` reads them back for tests.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vipd.smtp import replies
from vipd.smtp.commands import Address
from vipd.smtp.replies import Reply

from .smtpd import App, Envelope, run_forever

__all__ = ["SinkApp", "StoredMessage", "read_store", "main"]


@dataclass(frozen=True)
class StoredMessage:
    id: str
    envelope: dict
    body: bytes
    path: Path


def read_store(store: Path) -> list[StoredMessage]:
    """Every message in a sink's folder, oldest first."""
    out = []
    for path in sorted(Path(store).glob("*.eml")):
        head, _, body = path.read_bytes().partition(b"\n")
        out.append(StoredMessage(path.stem, json.loads(head), body, path))
    return sorted(out, key=lambda m: (m.envelope.get("received_at", 0), m.id))


class SinkApp(App):
    def __init__(self, store: Path, *, name: str, hostname: str, fsync: bool = True,
                 xclient_from: tuple = (), reject_rcpt: str | None = None, quiet: bool = False) -> None:
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.hostname = hostname
        self.fsync = fsync
        self.xclient_from = xclient_from
        self.reject_rcpt = re.compile(reject_rcpt) if reject_rcpt else None
        self.quiet = quiet
        self._seq = itertools.count(1)
        self._prefix = f"{name}-{os.getpid()}-{os.urandom(3).hex()}"

    def rcpt(self, env: Envelope, rcpt: Address) -> Reply:
        if self.reject_rcpt is not None and self.reject_rcpt.search(rcpt.text):
            return Reply(550, "5.1.1", f"<{rcpt.text}>: Recipient address rejected: User unknown")
        return replies.RCPT_OK

    def message(self, env: Envelope, body: bytes) -> Reply:
        msg_id = f"{self._prefix}-{next(self._seq):06d}"
        envelope = {"id": msg_id, "sink": self.name, "mail_from": env.sender, "rcpt_to": env.recipients,
                    "client_ip": env.client_ip, "peer_ip": env.peer_ip, "helo": env.helo,
                    "xclient": env.xclient, "received_at": env.received_at, "size": len(body),
                    "connection": env.connection}
        data = json.dumps(envelope).encode() + b"\n" + body
        final = self.store / f"{msg_id}.eml"
        tmp = self.store / f".{msg_id}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        if self.fsync:
            dirfd = os.open(self.store, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        if not self.quiet:
            print(f"stored {msg_id} from=<{env.sender}> to={','.join(f'<{r}>' for r in env.recipients)} "
                  f"size={len(body)} client={env.client_ip} file={final}", flush=True)
        return replies.OK.with_text(f"Ok: queued as {msg_id}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends.sink", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--store", required=True, help="folder for stored messages")
    p.add_argument("--name", default="sink", help="name used in file names and the banner")
    p.add_argument("--hostname", default=None)
    p.add_argument("--xclient-from", action="append", default=[], metavar="CIDR",
                   help="peers allowed to use XCLIENT (repeatable)")
    p.add_argument("--reject-rcpt", metavar="REGEX", help="answer 550 5.1.1 to matching recipients")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync (benchmarks only)")
    p.add_argument("--quiet", action="store_true", help="do not print a line per message")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in args.xclient_from)
    app = SinkApp(Path(args.store), name=args.name, hostname=args.hostname or f"{args.name}.vipd.test",
                  fsync=not args.no_fsync, xclient_from=nets, reject_rcpt=args.reject_rcpt,
                  quiet=args.quiet)
    run_forever(app, args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
