"""What a check decides: accept, or refuse with the reply the client gets (Haraka's DENY/DENYSOFT/
DENYDISCONNECT in spirit), plus the sendmail access-map outcomes that change later checks.

Rules: a verdict carries its own reply and the name of the check that gave it, so the session can
send it, log it and count it (``vipd_policy_verdicts_total{check,verdict}``) without knowing the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..smtp.replies import Reply

__all__ = ["Verdict", "ACCEPT", "Kind"]

Kind = Literal[
    "accept",      # this check has no objection; later checks still run
    "ok",          # sendmail OK: accept and skip the remaining checks of this stage (e.g. DNSBL)
    "relay",       # sendmail RELAY: accept, and the client may relay / the domain is relayed for
    "discard",     # sendmail DISCARD: accept, then throw the message away
    "reject",      # permanent refusal (5xx)
    "tempfail",    # temporary refusal (4xx)
    "disconnect",  # refuse and close (421 or 554 at connect)
]


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    reply: Reply | None = None
    check: str = ""

    @property
    def refuses(self) -> bool:
        return self.kind in ("reject", "tempfail", "disconnect")


ACCEPT = Verdict("accept")
