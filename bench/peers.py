"""The other SMTP relays the bench measures vipd against, each as a ``bench.system.System``.

One job: install, start, stop and describe the peers (HAProxy, nginx mail, Haraka, Postfix, sendmail,
a plain Python relay), each on 127.0.0.1 in front of the sinks it is given, in the foreground under
the bench. Their config files are templates in ``bench/peer_conf/`` filled with ``string.Template``.

``python -m bench.peers nginx-auth-http ...`` runs the auth_http responder that nginx's mail proxy
needs (part of the nginx peer; started by it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import importlib.metadata
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.system import Endpoint, System, Unavailable

__all__ = ["PEERS", "HAProxy", "NginxMail", "Haraka", "Postfix", "Sendmail", "PythonRelay",
           "free_port", "wait_listening", "render"]

CONF = Path(__file__).resolve().parent / "peer_conf"
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
HOSTNAME = "bench.vipd.test"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
HARAKA_VERSION = "3.3.4"


# ---------------------------------------------------------------------------------------- helpers

def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def render(template: Path, dest: Path, **values: object) -> Path:
    """Fill ``template`` with ``string.Template.substitute`` and write it to ``dest``."""
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


def _listening(host: str, port: int) -> bool:
    """Whether some socket listens on host:port (read from /proc/net/tcp: no connection is made)."""
    want = "%s:%04X" % ("".join(f"{int(b):02X}" for b in reversed(host.split("."))), port)
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return True
    return False


def wait_listening(host: str, port: int, procs: list[subprocess.Popen], log: Path | None = None,
                   timeout: float = READY_TIMEOUT) -> None:
    """Block until host:port listens; fail early when one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while not _listening(host, port):
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before listening on "
                                   f"{host}:{port}{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f}s{_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _read_line(proc: subprocess.Popen, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match:
    """Read the child's stdout until a line matches ``pattern`` (the child reports its port)."""
    result: list[re.Match] = []

    def reader() -> None:  # keeps draining stdout, so the child never blocks on a full pipe
        with contextlib.suppress(ValueError, OSError):
            for raw in proc.stdout:
                m = None if result else re.search(pattern, raw.decode(errors="replace"))
                if m:
                    result.append(m)
                    found.set()

    found = threading.Event()
    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if not result:
        raise RuntimeError(f"{proc.args[:2]} did not report /{pattern}/ (exit code {proc.poll()})")
    return result[0]


def run(cmd: list[str], *, timeout: float = 600, error: type[Exception] = Unavailable,
        **kw) -> subprocess.CompletedProcess:
    """Run a command to its end; raise ``error`` (Unavailable: a setup step) with its output if it fails."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as exc:
        raise error(f"{cmd[0]}: not found") from exc
    except subprocess.CalledProcessError as exc:
        out = (exc.stdout or "") + (exc.stderr or "")
        raise error(f"{' '.join(cmd[:4])} failed ({exc.returncode}): {out.strip()[-600:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{' '.join(cmd[:4])} timed out after {timeout}s") from exc


def _deb_version(package: str) -> str:
    """Installed version of a Debian package, "" if not installed."""
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", package],
                       capture_output=True, text=True)
    status, _, version = r.stdout.partition("\t")
    return version if r.returncode == 0 and status.endswith(" installed") else ""


_APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
_APT_GET = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=600"]


def _ensure_policy_rc_d() -> None:
    """Package scripts must not start services (LAB_NOTES: policy-rc.d exits 101)."""
    path = Path("/usr/sbin/policy-rc.d")
    if not path.exists():
        path.write_text("#!/bin/sh\nexit 101\n")
        path.chmod(0o755)


def apt_install(packages: list[str], *, wrap: list[str] = ()) -> None:
    """Install Debian packages that are missing (``apt-get update`` once if the first try fails)."""
    missing = [p for p in packages if not _deb_version(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{' '.join(missing)} not installed and not root")
    _ensure_policy_rc_d()
    cmd = [*wrap, *_APT_GET, "install", "-y", "--no-install-recommends", *missing]
    try:
        run(cmd, env=_APT_ENV)
    except Unavailable:
        run([*_APT_GET, "update"], env=_APT_ENV)
        run(cmd, env=_APT_ENV)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (zombies count as gone)."""
    st = _proc_stat(pid)
    return st is not None and st[19] == start and st[0] != "Z"


def _tree(root: int) -> list[tuple[int, str]]:
    """``root`` and its descendants as (pid, start time) pairs, to signal exactly these later."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _proc_stat(int(d.name))):
            children.setdefault(int(st[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if st := _proc_stat(pid):
            out.append((pid, st[19]))
            todo.extend(children.get(pid, []))
    return out


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _end(procs: list[tuple[int, str]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM these exact processes, wait up to ``timeout``, SIGKILL the rest."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in procs:
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(_alive(p, s) for p, s in procs) and time.monotonic() < deadline:
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """Stop one started process and every process of its tree: SIGTERM, wait, SIGKILL."""
    tree = _tree(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    _end(tree[1:], timeout)


class Peer(System):
    """What the peers share: processes started in their own session, logs in the workdir, stop."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []
        self._workdir: Path | None = None
        self._cache: Path | None = None

    def spawn(self, cmd: list[str], log_name: str, *, stdout_pipe: bool = False,
              **kw) -> subprocess.Popen:
        assert self._workdir is not None
        log = self._workdir / log_name
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if stdout_pipe else f,
                                    stderr=f, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        if self._procs:
            raise RuntimeError(f"{self.name} is already running")
        if not sinks:
            raise ValueError("no sinks")
        self._workdir = Path(workdir).resolve()
        self._workdir.mkdir(parents=True, exist_ok=True)
        try:
            return self._start(self._workdir, list(sinks))
        except BaseException:
            self.stop()
            raise

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def stop(self) -> None:
        # every process of every tree as it is now: children that outlive their parent
        # (reparented elsewhere) are still found and ended
        trees = [t for p in self._procs if p.poll() is None for t in _tree(p.pid)]
        if trees:
            try:
                self._shutdown()
            except (OSError, subprocess.SubprocessError):
                pass
        for proc in reversed(self._procs):
            stop_process(proc)
            if proc.stdout:
                proc.stdout.close()
        _end(trees)
        self._procs.clear()

    def _shutdown(self) -> None:
        """The peer's own clean stop, before the SIGTERM/SIGKILL of ``stop_process``."""

    def _need_cache(self, cache: Path) -> Path:
        self._cache = Path(cache).resolve()
        self._cache.mkdir(parents=True, exist_ok=True)
        return self._cache


# ------------------------------------------------------------------------------------------ peers

class HAProxy(Peer):
    name = "haproxy"
    description = "HAProxy, mode tcp, roundrobin over the sinks, nbthread 1 (no SMTP awareness)"

    def prepare(self, cache: Path) -> None:
        apt_install(["haproxy"])

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        port = free_port()
        servers = "\n".join(f"    server sink{i} {s.host}:{s.port}" for i, s in enumerate(sinks, 1))
        cfg = render(CONF / "haproxy.cfg", workdir / "haproxy.cfg", port=port, servers=servers)
        proc = self.spawn(["haproxy", "-db", "-f", str(cfg)], "haproxy.log")
        wait_listening(HOST, port, [proc], workdir / "haproxy.log")
        return Endpoint(HOST, port)

    def version(self) -> str:
        return _deb_version("haproxy")


class NginxMail(Peer):
    name = "nginx-mail"
    description = "nginx mail proxy (smtp_auth none, proxy on) + its auth_http responder picking the sink"

    def prepare(self, cache: Path) -> None:
        apt_install(["nginx", "libnginx-mod-mail"])

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        auth = self.spawn([sys.executable, "-m", "bench.peers", "nginx-auth-http", "--listen", f"{HOST}:0",
                           *itertools.chain.from_iterable(("--backend", str(s)) for s in sinks)],
                          "nginx-auth.log", stdout_pipe=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
        auth_port = int(_read_line(auth, r"listening \S+:(\d+)").group(1))
        port = free_port()
        cfg = render(CONF / "nginx.conf", workdir / "nginx.conf", port=port, auth_port=auth_port,
                     workdir=workdir)
        proc = self.spawn(["nginx", "-p", str(workdir), "-e", str(workdir / "nginx-error.log"),
                           "-c", str(cfg)], "nginx.log")
        wait_listening(HOST, port, [proc, auth], workdir / "nginx-error.log")
        return Endpoint(HOST, port)

    def version(self) -> str:
        return _deb_version("nginx")


class _AuthHTTP(asyncio.Protocol):
    """nginx mail auth_http: every session is OK and goes to the next backend (round robin).

    nginx asks once per SMTP session, on a new connection each time (HTTP/1.0, no keep-alive), so the
    responder is a plain asyncio protocol on one thread: read the request head, write a canned answer,
    close. It costs a fraction of what a thread and an http.server handler per request cost, and its
    listen backlog holds a burst of sessions (socketserver's default of 5 overflowed when 50 SMTP
    sessions started at once: every dropped SYN held that session 1 s, then 3 s, ... of TCP
    retransmission before nginx knew its backend)."""

    def __init__(self, answers: itertools.cycle) -> None:
        self._answers = answers
        self._head = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._head += data
        if self._transport is None:
            return
        if b"\r\n\r\n" in self._head:
            self._transport.write(next(self._answers))
            self._transport.close()
        elif len(self._head) > 65536:  # not a request nginx sends
            self._transport.abort()


def _auth_answer(host: str, port: int) -> bytes:
    return (f"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {host}\r\nAuth-Port: {port}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()


def nginx_auth_http(listen: str, backends: list[str]) -> None:
    host, _, port = listen.rpartition(":")
    answers = itertools.cycle([_auth_answer(b.rpartition(":")[0], int(b.rpartition(":")[2]))
                               for b in backends])

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _AuthHTTP(answers), host, int(port), backlog=1024)
        print(f"listening {host}:{server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())


class Haraka(Peer):
    name = "haraka"
    description = "Haraka (Node.js), relay ACL 127/8, queue/smtp_forward over a host pool of the sinks, one process"

    def _root(self) -> Path:
        assert self._cache is not None
        return self._cache / "haraka"

    def prepare(self, cache: Path) -> None:
        self._need_cache(cache)
        if shutil.which("node") is None or shutil.which("npm") is None:
            raise Unavailable("node/npm not found")
        root = self._root()
        if not (root / "node_modules" / "Haraka" / "package.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            run(["npm", "install", "--prefix", str(root), "--no-audit", "--no-fund", "--loglevel=error",
                 f"Haraka@{HARAKA_VERSION}"], cwd=root)

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        if self._cache is None:
            raise RuntimeError("haraka: prepare() first")
        port = free_port()
        home = workdir / "haraka"
        values = {"port": port, "pool": ", ".join(str(s) for s in sinks)}
        # Haraka's default config files first (connection.ini and co. are required), then ours over them
        shutil.copytree(self._root() / "node_modules" / "Haraka" / "config", home / "config", dirs_exist_ok=True)
        for tmpl in sorted((CONF / "haraka").rglob("*")):  # config/* and plugins/*
            if tmpl.is_file():
                render(tmpl, home / tmpl.relative_to(CONF / "haraka"), **values)
        (home / "queue").mkdir(exist_ok=True)
        haraka = self._root() / "node_modules" / "Haraka" / "bin" / "haraka"
        # stop: SIGTERM ends Node at once (Haraka itself handles only SIGINT, gracefully)
        proc = self.spawn(["node", str(haraka), "-c", str(home)], "haraka.log", cwd=home)
        wait_listening(HOST, port, [proc], workdir / "haraka.log")
        return Endpoint(HOST, port)

    def version(self) -> str:
        if self._cache is None:
            return ""
        pkg = self._root() / "node_modules" / "Haraka" / "package.json"
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        return f"{json.loads(pkg.read_text())['version']} (node {node})" if pkg.exists() else ""


class Postfix(Peer):
    name = "postfix"
    description = "Postfix from its .deb, store-and-forward relay, randmap transport over the sinks"

    _data_tmp: Path | None = None
    extra_main_cf = ""      # lines appended to main.cf (the tests use it for XCLIENT)

    def _root(self) -> Path:
        assert self._cache is not None
        return self._cache / "postfix" / "root"

    def prepare(self, cache: Path) -> None:
        self._need_cache(cache)
        root = self._root()
        if not (root / "usr" / "sbin" / "postfix").exists():
            unpack_postfix(self._cache)
        for cmd, check in ((["groupadd", "--system", "postdrop"], ["getent", "group", "postdrop"]),
                           (["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                             "--shell", "/usr/sbin/nologin", "--user-group", "postfix"],
                            ["getent", "passwd", "postfix"])):
            if subprocess.run(check, capture_output=True).returncode != 0:
                run(cmd)
        # as the package's postinst does (else "postfix check" warns on every start)
        gid = grp.getgrnam("postdrop").gr_gid
        for prog in ("postdrop", "postqueue"):
            path = root / "usr" / "sbin" / prog
            os.chown(path, 0, gid)
            path.chmod(0o2555)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(self._root() / "usr" / "lib" / "postfix")}

    def _postfix(self, *args: str) -> list[str]:
        assert self._workdir is not None
        return [str(self._root() / "usr" / "sbin" / "postfix"), "-c", str(self._workdir / "etc"), *args]

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        if self._cache is None:
            raise RuntimeError("postfix: prepare() first")
        port = free_port()
        conf, queue, data = workdir / "etc", workdir / "queue", workdir / "data"
        if not _others_can_enter(workdir):
            # the daemons open data_directory files by absolute path as user postfix, so every folder
            # above it must be searchable: a private workdir (mode 0700, as mkdtemp makes) is not
            self._data_tmp = Path(tempfile.mkdtemp(prefix="vipd-bench-postfix-data-"))
            data = self._data_tmp
        for d in (conf, queue, data):
            d.mkdir(exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        data.chmod(0o755)
        values = dict(conf_dir=conf, queue_dir=queue, data_dir=data, root=self._root(), workdir=workdir,
                      port=port, transports=", ".join(f"smtp:[{s.host}]:{s.port}" for s in sinks))
        render(CONF / "postfix" / "main.cf", conf / "main.cf", **values)
        render(CONF / "postfix" / "master.cf", conf / "master.cf", **values)
        if self.extra_main_cf:
            with open(conf / "main.cf", "a") as f:
                f.write("\n" + self.extra_main_cf)
        # start-fg: the master stays in the foreground (as a child of postfix-script, our Popen)
        proc = self.spawn(self._postfix("start-fg"), "postfix.log", env=self._env())
        wait_listening(HOST, port, [proc], workdir / "maillog")
        return Endpoint(HOST, port)

    def _shutdown(self) -> None:
        # "postfix stop" signals the master and waits for it; the start-fg script then exits
        subprocess.run(self._postfix("stop"), env=self._env(), capture_output=True, timeout=30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._procs[0].wait(STOP_TIMEOUT)

    def stop(self) -> None:
        super().stop()
        if self._data_tmp is not None:
            shutil.rmtree(self._data_tmp, ignore_errors=True)
            self._data_tmp = None

    def version(self) -> str:
        """The unpacked package's version. bench/postfix.py unpacks the .deb in a temporary folder and
        keeps only its Version field, in cache/postfix/version; a .deb that unpack_postfix left in the
        folder says it too; else Postfix's own mail_version (upstream version, no Debian revision)."""
        if self._cache is None:
            return ""
        folder = self._cache / "postfix"
        with contextlib.suppress(OSError):
            if text := (folder / "version").read_text().strip():
                return text
        for deb in sorted(folder.glob("postfix_*.deb"), reverse=True):
            r = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
        postconf = self._root() / "usr" / "sbin" / "postconf"
        with tempfile.TemporaryDirectory() as conf:  # -c: an empty config folder, not /etc/postfix
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                r = subprocess.run([str(postconf), "-c", conf, "-d", "-h", "mail_version"], env=self._env(),
                                   capture_output=True, text=True, timeout=30)
                if r.returncode == 0 and r.stdout.strip():
                    return r.stdout.strip()
        return ""


def _others_can_enter(path: Path) -> bool:
    """Whether every folder from / down to ``path`` is searchable by any user (mode o+x)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def unpack_postfix(cache: Path) -> Path:
    """``apt-get download postfix`` and ``dpkg-deb -x`` it under cache/postfix/root (also brings
    smtp-sink and smtp-source: run them with LD_LIBRARY_PATH=root/usr/lib/postfix)."""
    folder = Path(cache) / "postfix"
    folder.mkdir(parents=True, exist_ok=True)
    if not list(folder.glob("postfix_*.deb")):
        try:
            run(["apt-get", "-q", "download", "postfix"], cwd=folder, env=_APT_ENV)
        except Unavailable:
            run([*_APT_GET, "update"], env=_APT_ENV)
            run(["apt-get", "-q", "download", "postfix"], cwd=folder, env=_APT_ENV)
    root = folder / "root"
    if not (root / "usr" / "sbin" / "postfix").exists():
        tmp = folder / "root.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run(["dpkg-deb", "-x", str(sorted(folder.glob("postfix_*.deb"))[-1]), str(tmp)])
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


class Sendmail(Peer):
    name = "sendmail"
    description = "sendmail -bD as the email-DMZ design runs it (.mc + m4), SMART_HOST to one sink"

    PACKAGES = ["sendmail-bin", "sendmail-cf", "m4"]

    def prepare(self, cache: Path) -> None:
        if all(_deb_version(p) for p in self.PACKAGES):
            return
        # the package's configure step runs "start-stop-daemon --stop --name sendmail": it would kill
        # every sendmail on the machine
        others = subprocess.run(["pgrep", "-x", "sendmail"], capture_output=True, text=True).stdout.split()
        if others:
            raise Unavailable(f"sendmail not installed, and installing it would kill the running "
                              f"sendmail processes {', '.join(others)}")
        # an FQDN hostname avoids newaliases' 60 s sleep in the postinst
        apt_install(self.PACKAGES, wrap=["unshare", "--uts", "sh", "-c", f"hostname {HOSTNAME}; exec \"$@\"",
                                         "sh"])

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        port = free_port()
        (workdir / "queue").mkdir(mode=0o700, exist_ok=True)
        (workdir / "service.switch").write_text("hosts files\n")
        (workdir / "hosts").write_text(f"127.0.0.1 localhost {HOSTNAME}\n::1 localhost {HOSTNAME}\n")
        (workdir / "aliases").write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
        (workdir / "statistics").touch()
        mc = render(CONF / "sendmail.mc", workdir / "sendmail.mc", workdir=workdir, port=port,
                    sink_port=sinks[0].port)
        cf = workdir / "sendmail.cf"
        cf.write_text(run(["m4", str(mc)], error=RuntimeError).stdout)
        # the host name must have a dot (else a 60 s sleep) and resolve without DNS: own UTS namespace,
        # and our hosts file over /etc/hosts in a private mount namespace
        hostname = f"hostname {HOSTNAME}; mount --bind {workdir / 'hosts'} /etc/hosts; exec \"$@\""
        run(["unshare", "--uts", "--mount", "sh", "-c", hostname, "sh", "/usr/sbin/sendmail", "-bi", "-C", str(cf)],
            timeout=30, error=RuntimeError)  # aliases.db
        # --pid --fork: sendmail is PID 1 of a new PID namespace, so the background delivery processes
        # that outlive their SMTP session are reparented to (and reaped by) the daemon, not init, and
        # stay in this peer's process tree. The Popen PID is unshare; its child is the daemon.
        # -q30s: queue runs for deferred mail (the design's -q10m would hold a deferral past a bench run)
        proc = self.spawn(["unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child",
                           "sh", "-c", hostname, "sh", "/usr/sbin/sendmail", "-bD", "-q30s", "-C", str(cf)],
                          "sendmail.log")
        wait_listening(HOST, port, [proc], workdir / "sendmail.log")
        return Endpoint(HOST, port)

    def _shutdown(self) -> None:
        # SIGTERM to the daemon (unshare's child): it signals its children and exits; unshare follows
        proc = self._procs[0]
        for pid in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)

    def version(self) -> str:
        return _deb_version("sendmail-bin")


class PythonRelay(Peer):
    name = "python-relay"
    description = "aiosmtpd in, aiosmtplib out on a new connection per message, round robin (plain asyncio)"

    def prepare(self, cache: Path) -> None:
        missing = [m for m in ("aiosmtpd", "aiosmtplib") if not _has_dist(m)]
        if missing:
            run([sys.executable, "-m", "pip", "install", "-q", *missing])

    def _start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        proc = self.spawn([sys.executable, str(CONF / "python_relay.py"), "--listen", f"{HOST}:0",
                           *itertools.chain.from_iterable(("--sink", str(s)) for s in sinks)],
                          "python-relay.log", stdout_pipe=True)
        port = int(_read_line(proc, r"listening \S+:(\d+)").group(1))
        return Endpoint(HOST, port)

    def version(self) -> str:
        try:
            return (f"aiosmtpd {importlib.metadata.version('aiosmtpd')}, aiosmtplib "
                    f"{importlib.metadata.version('aiosmtplib')}, python {sys.version.split()[0]}")
        except importlib.metadata.PackageNotFoundError:
            return ""


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


PEERS: list[System] = [HAProxy(), NginxMail(), Haraka(), Postfix(), Sendmail(), PythonRelay()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    auth = sub.add_parser("nginx-auth-http", help="nginx mail auth_http responder (round robin)")
    auth.add_argument("--listen", default=f"{HOST}:0")
    auth.add_argument("--backend", action="append", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "nginx-auth-http":
        nginx_auth_http(args.listen, args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
