"""A real spamd (SpamAssassin's daemon) for the tests, started by backends.spamd_daemon with its small
rule set (GTUBE and a few header tests: it loads in under a second; the full rules take half a minute)."""

from __future__ import annotations

from collections.abc import Iterator

from backends.spamd_daemon import GTUBE, SpamdDaemon, SpamdUnavailable
from clamd_lab import skip_or_fail

__all__ = ["GTUBE", "run_spamd"]


def run_spamd(tmp_path_factory) -> Iterator[SpamdDaemon]:
    """Start spamd (skip, or fail in CI, when it cannot run); yield it; stop it."""
    daemon = SpamdDaemon(tmp_path_factory.mktemp("spamd"))
    try:
        try:
            daemon.start()
        except SpamdUnavailable as exc:
            skip_or_fail(str(exc))
        yield daemon
    finally:
        daemon.stop()
