"""A helper daemon (clamd, spamd) as our child: start it, wait until it answers, read its logs, stop it by PID."""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["die_with_parent", "in_pid_namespace", "start_until_ready", "stop_child", "tail_logs"]

_PR_SET_PDEATHSIG = 1
# Looked up here, in the parent: loading a library between fork and exec is not safe with threads.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the thread that started it ends (Linux), so that
    a lab killed with SIGKILL, which cannot clean up, leaves no orphan behind. Best effort: a child
    that changes its user (spamd dropping to nobody) loses the setting, as the kernel clears it."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def in_pid_namespace(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in a PID namespace of its own that dies with us, when we are root and
    util-linux can; ``argv`` unchanged otherwise.

    For a daemon that changes its user (spamd), whose parent-death signal the kernel clears: the
    namespace's PID 1 is a plain shell that keeps ``unshare --kill-child``'s signal, so "we die ->
    unshare (setpriv's signal) -> the shell (unshare's) -> the kernel empties the namespace" holds even
    when we are SIGKILLed (the same chain as backends.sendmail's instances). Stop it with
    ``stop_child(..., kill=True)``: unshare holds SIGTERM back until its child ends.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return argv
    return ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--pid", "--fork", "--kill-child",
            "sh", "-c", f"{shlex.join(argv)} & wait $!"]


def start_until_ready(command: list[str], output: Path, ready: Callable[[], bool],
                      timeout_seconds: float) -> tuple[subprocess.Popen, float | None]:
    """Start ``command`` (stdout and stderr appended to ``output``) and poll ``ready`` until it holds:
    (the process, seconds it took), or (the process, None) when it died or ``timeout_seconds`` passed
    (the caller stops it and says why)."""
    began = time.monotonic()
    with open(output, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
    deadline = began + timeout_seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return proc, time.monotonic() - began
        time.sleep(0.05)
    return proc, None


def stop_child(proc: subprocess.Popen | None, grace_seconds: float = 10.0, kill: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``grace_seconds`` (``kill``: SIGKILL at once); reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    if kill:
        proc.kill()
        proc.wait()
        return
    proc.terminate()
    try:
        proc.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail_logs(folder: Path, names: tuple[str, ...], limit: int = 2000) -> str:
    """The last ``limit`` characters of each of these files that exists, for an error message."""
    return "".join((folder / name).read_text(errors="replace")[-limit:] for name in names
                   if (folder / name).exists())
