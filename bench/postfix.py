"""Postfix's test tools, ``smtp-source`` (the load generator) and ``smtp-sink`` (the sinks).

Postfix's Debian package conflicts with sendmail's, so it is never installed: ``apt-get download``
fetches the .deb into the cache and ``dpkg-deb -x`` unpacks it there, once. The binaries look for
their libraries in /usr/lib/postfix (RUNPATH), so every run sets ``LD_LIBRARY_PATH`` to the
unpacked copy (``Tools.env()``). An installed Postfix (/usr/sbin/smtp-source) is used as it is.

Rules: ``unpack()`` is idempotent and safe to call from several systems: the tree is unpacked in a
temporary folder and renamed to ``cache/postfix/root`` last (the layout bench/peers.py also uses);
it raises ``Unavailable`` when neither an installed copy nor ``apt-get download`` is there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .system import Unavailable

__all__ = ["Tools", "unpack"]

_INSTALLED = Path("/")
_ROOT, _VERSION = "root", "version"


@dataclass(frozen=True)
class Tools:
    """Where the Postfix tree is: ``root / "usr/sbin/smtp-source"`` and friends."""

    root: Path
    version: str

    @property
    def smtp_source(self) -> Path:
        return self.root / "usr/sbin/smtp-source"

    @property
    def smtp_sink(self) -> Path:
        return self.root / "usr/sbin/smtp-sink"

    @property
    def libdir(self) -> Path:
        return self.root / "usr/lib/postfix"

    def env(self) -> dict[str, str]:
        """The environment to run the binaries with (the unpacked libraries first)."""
        env = dict(os.environ)
        if self.root != _INSTALLED:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.libdir), env.get("LD_LIBRARY_PATH")]))
        return env


def unpack(cache: Path) -> Tools:
    """The Postfix tools: the installed ones, else the package unpacked under ``cache/postfix/root``."""
    if (_INSTALLED / "usr/sbin/smtp-source").exists() and (_INSTALLED / "usr/sbin/smtp-sink").exists():
        return Tools(_INSTALLED, _installed_version())
    folder = cache / "postfix"
    root = folder / _ROOT
    if not (root / "usr/sbin/smtp-source").exists():
        _download_and_extract(folder)
    version = folder / _VERSION
    return Tools(root, version.read_text().strip() if version.exists() else "unknown")


def _installed_version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postfix"], capture_output=True, text=True)
    return out.stdout.strip() or "installed"


def _download_and_extract(folder: Path) -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise Unavailable(f"smtp-source/smtp-sink: no {tool} to fetch Postfix's package")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        work = Path(tmp)
        _download(work)
        deb = next(work.glob("postfix_*.deb"), None)
        if deb is None:
            raise Unavailable("apt-get download postfix left no .deb")
        _run(["dpkg-deb", "-x", str(deb), str(work / _ROOT)], work, "dpkg-deb -x")
        (folder / _VERSION).write_text(_run(["dpkg-deb", "-f", str(deb), "Version"], work, "dpkg-deb -f"))
        shutil.rmtree(folder / _ROOT, ignore_errors=True)     # a partial tree left by an interrupted run
        (work / _ROOT).rename(folder / _ROOT)


def _download(work: Path) -> None:
    """``apt-get download postfix``; on a machine whose package lists are empty, update them first."""
    try:
        _run(["apt-get", "download", "postfix"], work, "apt-get download postfix")
    except Unavailable:
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update"], work, "apt-get update")
        _run(["apt-get", "download", "postfix"], work, "apt-get download postfix")


def _run(args: list[str], cwd: Path, what: str) -> str:
    try:
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{what}: {exc}") from exc
    if out.returncode != 0:
        raise Unavailable(f"{what} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout
