"""A helper daemon (clamd, spamd) as our child: start it, wait until it answers, read its logs, stop it by PID."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["start_until_ready", "stop_child", "tail_logs"]


def start_until_ready(command: list[str], output: Path, ready: Callable[[], bool],
                      timeout_seconds: float) -> tuple[subprocess.Popen, float | None]:
    """Start ``command`` (stdout and stderr appended to ``output``) and poll ``ready`` until it holds:
    (the process, seconds it took), or (the process, None) when it died or ``timeout_seconds`` passed
    (the caller stops it and says why)."""
    began = time.monotonic()
    with open(output, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = began + timeout_seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return proc, time.monotonic() - began
        time.sleep(0.05)
    return proc, None


def stop_child(proc: subprocess.Popen | None, grace_seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_seconds``; reaped either way."""
    if proc is None or proc.poll() is not None:
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
