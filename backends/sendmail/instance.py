"""Build one sendmail instance in its own folder, run it on a loopback port without an init system, and stop it
leaving no process behind.

Rule: every process this module starts is stopped by PID, and the instance owns everything under its folder and
nothing outside it. The host's /etc/mail, /dev and /etc stay untouched; no name lookup leaves the machine.

How sendmail runs, and why (each point was measured on a Debian 12 machine without init or syslog):

``setpriv --pdeathsig KILL -- unshare --uts --mount --pid --fork --kill-child sh -c '<setup>; sendmail -bD ... & wait $!'``

- UTS namespace: its own dotted host name. With the machine's short name, sendmail sleeps 60 s before it even
  reads the .cf ("My unqualified host name unknown").
- Mount namespace: the instance's ``dev/`` replaces /dev. It holds null, zero, random and urandom, and a
  ``log`` socket that a thread here reads into ``maillog``: there is no syslog daemon, and sendmail logs only
  through /dev/log. The instance's hosts, resolv.conf and nsswitch.conf replace the host's, so libc's lookups
  (its own name, client PTRs) are answered from the instance's hosts file, not from an off-machine resolver.
- PID namespace: delivery children call setsid() and, once their parent has gone, init adopts them, so
  killing a process group misses them. When a namespace's PID 1 exits, the kernel kills everything in it.
  PID 1 is a shell that waits for sendmail (``namespace_command`` says why not sendmail itself).
- ``-bD`` keeps the daemon in the foreground and ``-q`` runs the queue at an interval (without it, deferred
  mail is never retried).
- Signals go only to a PID still inside the instance's namespace, so a reused PID is never hit.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from . import mc
from .mc import Layout, Settings

__all__ = ["SENDMAIL", "SendmailError", "SendmailInstance", "SendmailUnavailable", "free_port", "missing"]

SENDMAIL = "/usr/sbin/sendmail"
_DEV_NODES = {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9)}
_SUN_PATH_MAX = 107


class SendmailUnavailable(RuntimeError):
    """This machine cannot run instances (no sendmail, m4 or sendmail-cf, or not root)."""


class SendmailError(RuntimeError):
    """Building, starting or stopping an instance failed; the message carries the evidence."""


def missing() -> list[str]:
    """What this machine lacks to run instances, as Debian package names or "root"; empty when ready."""
    lacks = []
    if not os.access(SENDMAIL, os.X_OK) or shutil.which("makemap") is None:
        lacks.append("sendmail-bin")
    if not Path(mc.CF_M4).exists():
        lacks.append("sendmail-cf")
    if shutil.which("m4") is None:
        lacks.append("m4")
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        lacks.append("util-linux")
    if os.geteuid() != 0:
        lacks.append("root")  # the daemon refuses other users: "real uid not trusted"
    return lacks


def free_port(address: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (sendmail cannot bind port 0 and tell which port it got)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class _SyslogReader:
    """Appends each datagram that arrives on a unix socket to a file, one line each, until closed."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
            raise SendmailError(f"{socket_path}: too long for a unix socket path; use a shorter instance folder")
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(socket_path))
        os.chmod(socket_path, 0o666)  # the daemon's children log after dropping to the run-as user
        self._sock.settimeout(0.2)
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"syslog {socket_path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._log.write(data.rstrip(b"\0\r\n") + b"\n")

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2)
        # A daemon's last lines ("stopping daemon") may still wait in the socket when it has just exited.
        self._sock.setblocking(False)
        with contextlib.suppress(OSError):
            while data := self._sock.recv(65536):
                self._log.write(data.rstrip(b"\0\r\n") + b"\n")
        self._sock.close()
        self._log.close()


class SendmailInstance:
    """One sendmail on ``listen_address:port`` with its configuration, queue, maps and logs in ``workdir``.

    ``settings`` are :class:`backends.sendmail.mc.Settings` fields (``smart_host="127.0.0.1:2526"``,
    ``relay_domains=["example.com"]``, ``mailertable={"example.com": "127.0.0.1:2600"}``, ...).
    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, workdir: Path, role: str, port: int, *, queue_interval_seconds: int = 1,
                 trace: bool = False, start_timeout_seconds: float = 20.0, **settings) -> None:
        self.settings = Settings(role=role, directory=Path(workdir).absolute(), port=port, **settings)
        self.layout: Layout = self.settings.layout
        self.queue_interval_seconds = queue_interval_seconds
        self.trace = trace
        self.start_timeout_seconds = start_timeout_seconds
        self.daemon_pid: int | None = None       # sendmail's PID as this machine sees it (its namespace has its own)
        self.pid_namespace: str | None = None    # "pid:[inode]" of the namespace sendmail runs in
        self.timings: dict[str, float] = {}
        self.m4_warnings = ""
        self._popen: subprocess.Popen | None = None
        self._init_pid: int | None = None          # the namespace's PID 1, a shell waiting for sendmail
        self._syslog: _SyslogReader | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen_address
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def host(self) -> str:
        return self.settings.listen_address

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def maillog(self) -> Path:
        return self.layout.maillog

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- build ---------------------------------------------------------------------------------------------

    def build(self) -> None:
        """Write the .mc and map sources, compile the .cf, build the maps, and lay out queue and dev."""
        lacks = missing()
        if lacks:
            raise SendmailUnavailable(f"cannot run sendmail here; missing: {', '.join(lacks)}")
        began = time.monotonic()
        s, paths = self.settings, self.layout
        uid, gid = _ids(s.run_as_user)
        paths.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(paths.directory, 0o755)
        if s.run_as_user:
            _check_reachable(paths.directory, s.run_as_user)
        for name, text in mc.render(s).items():
            (paths.directory / name).write_text(text)
        self._compile_cf()
        self._make_map(paths.access)
        if s.mailertable:
            self._make_map(paths.mailertable)
        paths.queue.mkdir(exist_ok=True)
        os.chown(paths.queue, uid, gid)
        os.chmod(paths.queue, 0o700)  # queued mail is readable by the run-as user alone, as in the paper
        paths.statistics.touch()
        os.chown(paths.statistics, uid, gid)
        os.chmod(paths.statistics, 0o600)
        paths.resolv_conf.write_text(f"nameserver {s.dns_server or '127.0.0.1'}\noptions timeout:1 attempts:1\n")
        paths.nsswitch_conf.write_text(_nsswitch(s.uses_dns))
        self._make_dev()
        self.timings["build_seconds"] = time.monotonic() - began

    def _compile_cf(self) -> None:
        paths = self.layout
        out = subprocess.run(["m4", str(paths.mc)], capture_output=True, text=True, timeout=60, check=False,
                             cwd=paths.directory)
        self.m4_warnings = out.stderr
        if out.returncode != 0 or "ERROR" in out.stderr:
            raise SendmailError(f"m4 {paths.mc} failed ({out.returncode}):\n{out.stderr}")
        paths.cf.write_text(out.stdout)
        lines = set(out.stdout.splitlines())
        lost = [line for line in mc.expected_cf_lines(self.settings) if line not in lines]
        if lost:
            raise SendmailError(f"{paths.cf}: m4 did not copy these settings word for word: {lost}")

    def _make_map(self, source: Path) -> None:
        with open(source, "rb") as fh:
            out = subprocess.run(["makemap", "hash", str(source)], stdin=fh, capture_output=True, text=True,
                                 timeout=60, check=False)
        if out.returncode != 0:
            raise SendmailError(f"makemap hash {source} failed ({out.returncode}):\n{out.stderr}")
        db = source.with_name(source.name + ".db")
        # makemap gives the .db to smmta; the daemon reads it after dropping to the run-as user.
        os.chown(db, 0, _ids(self.settings.run_as_user)[1])
        os.chmod(db, 0o640)

    def _make_aliases(self) -> None:
        # As the run-as user, newaliases could not write in the root-owned folder; the daemon only reads.
        as_root = ["-ORunAsUser=root"] if self.settings.run_as_user else []
        out = self.run_tool(*as_root, "-bi")
        if out.returncode != 0:
            raise SendmailError(f"sendmail -bi (aliases) failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        db = self.layout.aliases.with_name(self.layout.aliases.name + ".db")
        os.chown(db, 0, _ids(self.settings.run_as_user)[1])
        os.chmod(db, 0o640)

    def _make_dev(self) -> None:
        dev = self.layout.dev
        dev.mkdir(exist_ok=True)
        for name, (major, minor) in _DEV_NODES.items():
            node = dev / name
            if not node.exists():
                os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(node, 0o666)
        try:
            with open(dev / "null", "wb") as fh:
                fh.write(b"")
        except OSError as exc:
            raise SendmailError(f"{dev}/null: device nodes do not work here ({exc}); is the folder on a "
                                "filesystem mounted nodev? Use another instance folder") from exc

    # -- run -----------------------------------------------------------------------------------------------

    def namespace_command(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run with the instance's host name, /dev and name lookups, in a PID namespace.

        The namespace's PID 1 is a shell that runs ``argv`` as its child and waits for it. sendmail cannot
        be PID 1 itself: it is setgid, and exec'ing a setgid binary clears the parent-death signal that
        ``--kill-child`` sets. A plain shell keeps it, so the chain "our process dies -> unshare
        (setpriv's signal) -> the shell (unshare's) -> the kernel empties the namespace" holds even when
        our own process is SIGKILLed. The parent-death signal follows the *thread* that started the
        instance: start it from a thread that outlives it (normally the main thread).
        """
        paths = self.layout
        binds = [(paths.dev, "/dev"), (paths.hosts, "/etc/hosts"), (paths.resolv_conf, "/etc/resolv.conf")]
        if Path("/etc/nsswitch.conf").exists():
            binds.append((paths.nsswitch_conf, "/etc/nsswitch.conf"))
        steps = ["set -e", f"hostname {shlex.quote(self.settings.hostname)}"]
        steps += [f"mount --bind {shlex.quote(str(src))} {dst}" for src, dst in binds]
        script = "; ".join(steps) + f"; {shlex.join(argv)} & wait $!"
        return ["setpriv", "--pdeathsig", "KILL", "--",
                "unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script]

    def run_tool(self, *args: str, timeout_seconds: float = 60.0) -> subprocess.CompletedProcess:
        """A one-off sendmail command on this instance's .cf (``-bp``, ``-bi``, ``-bt``...), in its namespaces."""
        argv = [SENDMAIL, "-C", str(self.layout.cf), *args]
        return subprocess.run(self.namespace_command(argv), capture_output=True, text=True,
                              timeout=timeout_seconds, stdin=subprocess.DEVNULL, check=False)

    def queue_listing(self) -> str:
        return self.run_tool("-bp").stdout

    def start(self) -> None:
        """Build, then start sendmail and return once it listens on its port and answers 220 there."""
        if self._popen is not None:
            raise SendmailError(f"{self.address}: already started")
        began = time.monotonic()
        self.daemon_pid = self._init_pid = self.pid_namespace = None  # a restart finds them anew
        self.build()
        paths = self.layout
        self._syslog = _SyslogReader(paths.dev / "log", paths.maillog)
        try:
            self._make_aliases()
            argv = [SENDMAIL, "-bD", f"-q{self.queue_interval_seconds}s", "-C", str(paths.cf)]
            if self.trace:
                argv += ["-X", str(paths.traffic_log)]  # the whole SMTP dialogue, both ways
            spawned = time.monotonic()
            with open(paths.output, "ab") as out:
                # A session of its own: a terminal's Ctrl-C reaches only our process, which stops sendmail.
                self._popen = subprocess.Popen(self.namespace_command(argv), stdin=subprocess.DEVNULL,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self._find_daemon()
            self._wait_ready()
        except BaseException:
            self.stop(timeout_seconds=2.0)  # a daemon still retrying its bind answers SIGTERM late
            raise
        now = time.monotonic()
        self.timings["spawn_to_220_seconds"] = now - spawned
        self.timings["start_seconds"] = now - began

    def _find_daemon(self) -> None:
        popen = self._popen
        assert popen is not None
        sendmail = os.path.realpath(SENDMAIL)

        def found() -> bool:
            self._check_running()
            if self._init_pid is None:
                init = _children(popen.pid)
                if not init:
                    return False
                self._init_pid = init[0]
                self.pid_namespace = os.readlink(f"/proc/{self._init_pid}/ns/pid")
            for pid in _children(self._init_pid):  # hostname and mount run first, as children too
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/exe") == sendmail:
                        self.daemon_pid = pid
                        return True
            return False

        _wait(found, self.start_timeout_seconds, "sendmail's process to appear", evidence=self._evidence)

    def _wait_ready(self) -> None:
        def ready() -> bool:
            self._check_running()
            if "cannot bind" in self.log():
                raise SendmailError(f"{self.address}: sendmail cannot bind its port (in use?)\n{self._evidence()}")
            # Our daemon must own the listening socket: a 220 alone could come from another server.
            if not _listens(self.daemon_pid, self.port):
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    greeting = sock.recv(512)
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
            except OSError:
                return False
            if not greeting.startswith(b"220"):
                raise SendmailError(f"{self.address} greeted with {greeting!r}, not 220\n{self._evidence()}")
            return True

        _wait(ready, self.start_timeout_seconds, f"sendmail to answer 220 on {self.address}",
              evidence=self._evidence)

    def _check_running(self) -> None:
        if self._popen is not None and self._popen.poll() is not None:
            raise SendmailError(f"sendmail on {self.address} exited with {self._popen.returncode}\n"
                                f"{self._evidence()}")

    def _evidence(self) -> str:
        output = self.layout.output.read_text(errors="replace") if self.layout.output.exists() else ""
        return f"--- {self.layout.output}:\n{output[-2000:]}\n--- {self.maillog}:\n{self.log()[-3000:]}"

    def processes(self) -> list[int]:
        """PIDs (as this machine sees them) of every process still in the instance's PID namespace."""
        if self.pid_namespace is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._in_namespace(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def _in_namespace(self, pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") == self.pid_namespace
        except OSError:
            return False

    def _kill(self, pid: int | None, sig: int) -> bool:
        """Signal ``pid`` only while it is still in the instance's namespace: a reused PID is someone else's."""
        if pid is None or not self._in_namespace(pid):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return True

    def kill(self) -> None:
        """SIGKILL to the namespace's PID 1, as a crash: the kernel ends every process in it at once,
        transactions in flight included; the queue stays on disk for the next ``start()``."""
        if self._init_pid is not None and self._kill(self._init_pid, signal.SIGKILL):
            _wait(lambda: not self.processes(), 5.0, "sendmail's namespace to empty after a kill")

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """SIGTERM to sendmail, SIGKILL to the namespace after ``timeout_seconds``; then check it is empty.

        Safe to call more than once, and after a failed start.
        """
        popen, self._popen = self._popen, None
        try:
            if popen is not None:
                if popen.poll() is None and not self._kill(self.daemon_pid, signal.SIGTERM):
                    # No daemon yet: the namespace's PID 1 takes everything in it along.
                    if not self._kill(self._init_pid, signal.SIGKILL):
                        popen.kill()  # not even a namespace yet; the parent-death signals cover the rest
                try:
                    popen.wait(timeout_seconds)
                except subprocess.TimeoutExpired:
                    self._kill(self._init_pid, signal.SIGKILL)
                    try:
                        popen.wait(5)
                    except subprocess.TimeoutExpired:
                        popen.kill()  # setpriv's and unshare's parent-death signals do the rest
                        popen.wait(5)
            try:
                _wait(lambda: not self.processes(), 5.0, "sendmail's namespace to empty")
            except SendmailError:
                for pid in self.processes():
                    self._kill(pid, signal.SIGKILL)
                _wait(lambda: not self.processes(), 5.0, "sendmail's namespace to empty after SIGKILL")
        finally:
            if self._syslog is not None:
                self._syslog.close()
                self._syslog = None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _listens(pid: int | None, port: int) -> bool:
    """Whether ``pid`` holds a TCP socket listening on ``port`` (from /proc: its fds, and the socket tables)."""
    if pid is None:
        return False
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
    return False


def _wait(predicate: Callable[[], bool], timeout_seconds: float, what: str,
          evidence: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout_seconds
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise SendmailError(f"timed out after {timeout_seconds} s waiting for {what}"
                                + (f"\n{evidence()}" if evidence else ""))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _ids(user: str | None) -> tuple[int, int]:
    if user is None:
        return 0, 0
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SendmailError(f"run_as_user {user!r}: no such user on this machine") from None
    return entry.pw_uid, entry.pw_gid


def _check_reachable(directory: Path, user: str) -> None:
    """Fail early, naming the folder, when ``user`` could not walk down to ``directory``."""
    uid, gid = _ids(user)
    groups = {gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for folder in [*reversed(directory.parents), directory]:
        st = folder.stat()
        if st.st_uid == uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            raise SendmailError(f"run_as_user {user!r} cannot enter {folder} (mode {stat.S_IMODE(st.st_mode):04o}), "
                                f"so sendmail could not reach its queue in {directory}: put the instance in a "
                                "folder others may enter, or set run_as_user=None")


def _nsswitch(uses_dns: bool) -> str:
    """The host's nsswitch.conf with host lookups from files only (plus DNS when the instance has a server)."""
    try:
        text = Path("/etc/nsswitch.conf").read_text()
    except OSError:
        text = "passwd: files\ngroup: files\nshadow: files\n"
    hosts = "hosts: files dns" if uses_dns else "hosts: files"
    text, found = re.subn(r"(?m)^hosts:.*$", hosts, text)
    return text if found else text + hosts + "\n"
