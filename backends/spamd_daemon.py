"""A private spamd (SpamAssassin's daemon) for the lab and the tests, with a small rule set written here.

Why a small rule set: with Debian's full rules spamd takes half a minute to compile them on a lab
machine, and most of them need network tests or rule updates that cannot run here. The rules below
(GTUBE, the standard test string, and a few header tests) load in well under a second, and the
spamd that scores with them is the real daemon, speaking the real protocol. Give ``rules=None`` to
load the system's own rules instead.

spamd drops root for ``nobody`` before it reads its configuration, so the configuration lives in a
folder of its own that ``nobody`` can read (``tempfile.mkdtemp`` under the system temp dir, mode
0755), removed by ``stop()``; the log goes to ``folder``. spamd runs in the foreground, local tests
only (``-L``, no DNS), on a loopback port and a unix socket (in the configuration folder: a short
path, as the kernel limits socket paths to 107 bytes). As root it runs in a PID namespace of its
own that dies with us (backends.child_daemon.in_pid_namespace: having changed its user, spamd would
otherwise outlive a lab killed with SIGKILL); ``stop()`` ends it by PID, children included.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from .child_daemon import in_pid_namespace, start_until_ready, stop_child, tail_logs
from .spamd import spamd_ping

__all__ = ["GTUBE", "RULES", "SpamdDaemon", "SpamdUnavailable", "find_spamd"]

# The Generic Test for Unsolicited Bulk Email: scores 1000 in every SpamAssassin.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

RULES = r"""# Written by vipd's backends.spamd_daemon: a small, fast rule set for the lab and the tests.
required_score 5.0
body GTUBE /XJS\*C4JDBQADN1\.NSBN3\*2IDNEN\*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL\*C\.34X/
describe GTUBE Generic Test for Unsolicited Bulk Email
score GTUBE 1000
header MISSING_DATE Date =~ /^UNSET$/ [if-unset: UNSET]
describe MISSING_DATE Missing Date: header
score MISSING_DATE 0.1
header MISSING_SUBJECT Subject =~ /^UNSET$/ [if-unset: UNSET]
describe MISSING_SUBJECT Missing Subject: header
score MISSING_SUBJECT 0.5
body VIPD_LAB_SPAMMY /\bbuy cheap (?:pills|watches) now\b/i
describe VIPD_LAB_SPAMMY A phrase the lab calls spam
score VIPD_LAB_SPAMMY 6.0
"""


class SpamdUnavailable(RuntimeError):
    """spamd is not installed, or did not start."""


def find_spamd() -> str | None:
    return shutil.which("spamd") or next((p for p in ("/usr/sbin/spamd", "/usr/bin/spamd") if os.access(p, os.X_OK)),
                                         None)


def _site_pre_files() -> list[Path]:
    """The ``.pre`` files that load SpamAssassin's plugins (v320.pre loads Check, without which it cannot scan)."""
    return sorted(Path("/etc/spamassassin").glob("*.pre"))


class SpamdDaemon:
    def __init__(self, folder: Path, *, port: int | None = None, rules: str | None = RULES) -> None:
        self.folder = Path(folder)
        self.port = port
        self.rules = rules
        self.proc: subprocess.Popen | None = None
        self.config_dir: Path | None = None
        self.start_seconds = 0.0

    @property
    def address(self) -> str:
        """As backends.content's ``--spamd`` takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def unix_path(self) -> str | None:
        return None if self.config_dir is None else str(self.config_dir / "spamd.sock")

    @property
    def log(self) -> str:
        return tail_logs(self.folder, ("spamd.out", "spamd.log"))

    def _write_config(self) -> list[str]:
        self.config_dir = Path(tempfile.mkdtemp(prefix="vipd-spamd-"))
        os.chmod(self.config_dir, 0o755)
        site = self.config_dir / "site"
        site.mkdir(mode=0o755)
        for pre in _site_pre_files():
            shutil.copyfile(pre, site / pre.name)
        (site / "local.cf").write_text("")
        args = [f"--siteconfigpath={site}", f"--helper-home-dir={self.config_dir}",
                f"--listen={self.config_dir / 'spamd.sock'}"]
        if self.rules is not None:
            rules = self.config_dir / "rules"
            rules.mkdir(mode=0o755)
            (rules / "10_vipd.cf").write_text(self.rules)
            args.append(f"--configpath={rules}")
        for path in self.config_dir.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        return args

    def start(self, timeout_seconds: float = 60.0) -> SpamdDaemon:
        """Start spamd and return once it answers PING; SpamdUnavailable when it cannot."""
        binary = find_spamd()
        if binary is None:
            raise SpamdUnavailable("spamd is not installed (Debian: spamd)")
        if not _site_pre_files():
            raise SpamdUnavailable("no /etc/spamassassin/*.pre: SpamAssassin's plugins are not installed")
        if self.port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [binary, "--local", "--nouser-config", f"--listen=127.0.0.1:{self.port}", "--max-children=2",
                   "--min-children=1", "--min-spare=1", "--max-spare=2", f"--syslog={self.folder / 'spamd.log'}",
                   *self._write_config()]
        if os.geteuid() == 0:
            command.append("--username=nobody")
        self.proc, seconds = start_until_ready(
            in_pid_namespace(command), self.folder / "spamd.out",
            lambda: asyncio.run(spamd_ping(host="127.0.0.1", port=self.port, timeout=1)), timeout_seconds)
        if seconds is None:
            self.stop()
            raise SpamdUnavailable(f"spamd did not start:\n{self.log}")
        self.start_seconds = seconds
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        try:
            # spamd keeps nothing worth a graceful stop, and in its namespace SIGKILL is the way out.
            stop_child(proc, kill=True)
        finally:
            if self.config_dir is not None:
                shutil.rmtree(self.config_dir, ignore_errors=True)
                self.config_dir = None
