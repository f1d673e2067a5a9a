"""Debian's HAProxy for the tests: found (skip, or fail in CI, when missing) and started on a socket the
test bound itself, so there is no window in which another process could take its port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from support import Lab, Proc, proc_check

DEFAULTS = """\
global
    nbthread 1
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
"""


def find_haproxy() -> str:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts it.
    found = shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if found:
        return found
    reason = "haproxy is not installed (Debian package haproxy)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set: this test must run")
    pytest.skip(reason)


def start_haproxy(lab: Lab, config: str, *, host: str = "127.0.0.1",
                  family: socket.AddressFamily = socket.AF_INET) -> tuple[Proc, int]:
    """HAProxy in the foreground on ``config`` (where ``{fd}`` stands for the listening socket, as in
    ``bind fd@{fd}``); checked with ``-c`` first, so a bad config fails loudly. (process, port)."""
    binary = find_haproxy()
    listener = socket.socket(family)
    try:
        listener.bind((host, 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        path = lab.tmp / "haproxy.cfg"
        path.write_text(config.replace("{fd}", str(listener.fileno())))
        checked = subprocess.run([binary, "-c", "-f", str(path)], check=False, capture_output=True, text=True,
                                 timeout=30, pass_fds=[listener.fileno()])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        log = lab.tmp / "haproxy.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, pass_fds=[listener.fileno()], cwd=lab.tmp)
    finally:
        listener.close()
    proc = Proc("haproxy", popen, log)
    lab.procs.append(proc)
    proc_check(proc)
    return proc, port
