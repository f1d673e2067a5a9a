"""The loads, and one run of the load generator (Postfix ``smtp-source``) against an endpoint.

A load is a message size, a number of parallel sessions, and one message per connection
(smtp-source's default: connect, HELO, MAIL, RCPT, DATA, QUIT for each message) or many
(``-d``: each session keeps its connection and sends message after message). ``-m`` is the total
number of messages over all sessions, ``-l`` the payload size; each message has one recipient.

Rules: every run names its sender, recipient and HELO name explicitly (no lookup of this
machine's name); a run that smtp-source reports as failed (any unexpected reply) raises RunError.
"""

from __future__ import annotations

import resource
import subprocess
from dataclasses import dataclass

from .postfix import Tools
from .system import Endpoint

__all__ = ["Load", "LOADS", "SMOKE_LOAD", "RunError", "send", "HELO", "SENDER", "RECIPIENT"]

HELO = "client.bench.test"
SENDER = "sender@client.bench.test"
RECIPIENT = "rcpt@sink.bench.test"


class RunError(Exception):
    """The load generator failed (refused messages, lost connections, timeout)."""


@dataclass(frozen=True)
class Load:
    size_kib: int
    sessions: int
    many: bool          # many messages per connection (True) or one (False)

    @property
    def name(self) -> str:
        return f"{self.size_kib}k-s{self.sessions}-{'many' if self.many else 'one'}"

    @property
    def label(self) -> str:
        per = "many msgs/conn" if self.many else "1 msg/conn"
        return f"{self.size_kib} KiB, {self.sessions} sess, {per}"

    @classmethod
    def parse(cls, name: str) -> Load:
        """``1k-s50-many`` -> Load(1, 50, True)."""
        try:
            size, sessions, per = name.split("-")
            if not (size.endswith("k") and sessions.startswith("s") and per in ("one", "many")):
                raise ValueError
            return cls(int(size[:-1]), int(sessions[1:]), per == "many")
        except ValueError:
            raise ValueError(f"bad load {name!r}: expected SIZEk-sSESSIONS-one|many, e.g. 1k-s50-many") from None


LOADS = [Load(size, sessions, many) for size in (1, 100) for sessions in (1, 50) for many in (False, True)]
SMOKE_LOAD = Load(1, 50, True)


def smtp_source_args(tools: Tools, load: Load, count: int, target: Endpoint) -> list[str]:
    args = [str(tools.smtp_source), "-M", HELO, "-f", SENDER, "-t", RECIPIENT,
            "-l", str(load.size_kib * 1024), "-m", str(count), "-s", str(load.sessions)]
    if load.many:
        args.append("-d")
    return [*args, str(target)]


def send(tools: Tools, load: Load, count: int, target: Endpoint, timeout: float) -> float:
    """Send ``count`` messages of ``load`` to ``target``; returns smtp-source's CPU seconds."""
    before = _children_cpu()
    try:
        out = subprocess.run(smtp_source_args(tools, load, count, target), env=tools.env(), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunError(f"smtp-source did not finish {count} messages in {timeout:g} s") from None
    if out.returncode != 0:
        raise RunError(f"smtp-source exited {out.returncode}: {(out.stderr or out.stdout).strip()[-500:]}")
    return _children_cpu() - before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
