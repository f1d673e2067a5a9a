"""The spool on disk: one file per queued message, written so that an acknowledged message survives
a crash, plus a small state file per message for what changes between delivery attempts.

Layout under ``spool_dir``::

    tmp/PID/ID        being written by process PID; never acknowledged; removed once PID is gone
    queue/ID.msg      complete: one JSON line (the envelope and the arrival facts), then the message
                      exactly as a backend is to receive it after DATA (dot-stuffed, CRLF, our
                      Received: header first), without the final dot
    queue/ID.state    JSON: recipients still to deliver, attempts, next attempt, last error, held...

The durability contract (DESIGN.md section 2): ``put`` returns only after the message file and the
directory entry that names it are on disk: temp file, fsync, rename, fsync of the directory. A
message is acknowledged to the client only after ``put`` returned. State files are replaced
atomically (temp + rename) but not fsynced: a state lost in a crash means one more attempt or a
duplicate delivery (at-least-once), never a lost message.

Several processes may share one spool: a delivery holds ``flock`` on the message file, so no two
processes work on the same message at once, and a crashed holder's lock goes with it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ..durable import fsync_dir, pid_alive

__all__ = ["Envelope", "Spool", "SpoolError", "State", "Stats", "new_id"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")
READ_BLOCK = 256 * 1024


class SpoolError(OSError):
    """A spool operation that failed (the message is then not acknowledged)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """What never changes about a queued message."""

    id: str
    pool: str
    sender: str                   # "" for the null sender
    recipients: tuple[str, ...]
    arrival: float                # epoch seconds
    client_ip: str = ""
    client_port: int = 0
    helo: str = ""
    esmtp: bool = True
    vip: str = ""
    size_param: int | None = None  # the client's MAIL SIZE=
    body_param: str | None = None  # the client's MAIL BODY=
    kind: str = "message"          # "message", or "dsn" for a notification we made

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "recipients": list(self.recipients)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        data = json.loads(text)
        data["recipients"] = tuple(data["recipients"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(slots=True)
class State:
    """What changes between attempts."""

    remaining: list[str]
    attempts: int = 0
    next_attempt: float = 0.0      # epoch seconds; 0: at once
    last_error: str = ""
    last_attempt: float = 0.0
    held: bool = False
    warned: bool = False           # the delay notice went out
    failed: list[dict[str, Any]] = field(default_factory=list)   # refused for good, to be bounced

    @classmethod
    def from_json(cls, text: str | bytes) -> State:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class Stats:
    messages: int
    bytes: int
    oldest_arrival: float | None


class Spool:
    """One spool folder. Blocking file operations: call them from a thread in the event loop."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.queue = self.root / "queue"
        # A temp folder per process: a worker starting up must not remove what a sibling is writing.
        self.tmp = self.root / "tmp" / str(os.getpid())
        for folder in (self.root, self.queue, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    # --- writing a new message -----------------------------------------------------------------
    def put(self, envelope: Envelope, chunks: Iterable[bytes]) -> int:
        """Store a message durably; the bytes written. Raises SpoolError and leaves nothing behind."""
        if not _ID.fullmatch(envelope.id):
            raise ValueError(f"bad spool id {envelope.id!r}")
        tmp = self.tmp / envelope.id
        final = self.queue / f"{envelope.id}.msg"
        written = 0
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                # Our temp folder went away (a sibling's recovery racing our start): make it again.
                self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    out.write(envelope.to_json().encode() + b"\n")
                    for chunk in chunks:
                        out.write(chunk)
                        written += len(chunk)
                    out.flush()
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            fsync_dir(self.queue)
        except OSError as exc:
            _unlink(tmp)
            if final.exists() and not tmp.exists():
                # Renamed but the directory could not be synced: not durable, so not acknowledged,
                # and not delivered either (the client will send it again).
                _unlink(final)
            raise SpoolError(exc.errno or errno.EIO, f"cannot write the spool: {exc.strerror or exc}") from exc
        return written

    # --- reading ---------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At start: drop unfinished writes of processes that are gone (never acknowledged); the ids
        of every complete message."""
        for folder in (self.root / "tmp").iterdir():
            if folder.name.isdigit() and (int(folder.name) == os.getpid() or not pid_alive(int(folder.name))):
                for leftover in folder.iterdir():
                    _unlink(leftover)
                if folder != self.tmp:
                    try:
                        folder.rmdir()
                    except OSError:
                        pass
        for state in self.queue.glob("*.state"):
            if not state.with_suffix(".msg").exists():
                _unlink(state)
        return self.ids()

    def ids(self) -> list[str]:
        return sorted(p.name[:-4] for p in self.queue.iterdir() if p.name.endswith(".msg"))

    def envelope(self, qid: str) -> Envelope:
        with open(self._msg(qid), "rb") as f:
            return Envelope.from_json(f.readline())

    def state(self, qid: str, envelope: Envelope | None = None) -> State:
        try:
            return State.from_json(self._state(qid).read_bytes())
        except FileNotFoundError:
            envelope = envelope or self.envelope(qid)
            return State(list(envelope.recipients))
        except ValueError:
            # A state file cut short by a crash: start over from the envelope (at-least-once).
            envelope = envelope or self.envelope(qid)
            return State(list(envelope.recipients))

    def save_state(self, qid: str, state: State) -> None:
        target = self._state(qid)
        tmp = self.tmp / f"{qid}.state.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(state), separators=(",", ":")))
        os.rename(tmp, target)

    def open_data(self, qid: str) -> tuple[IO[bytes], int]:
        """The message file, open, and the offset where the message data starts."""
        f = open(self._msg(qid), "rb")
        f.readline()
        return f, f.tell()

    def data_size(self, qid: str) -> int:
        f, offset = self.open_data(qid)
        with f:
            return os.fstat(f.fileno()).st_size - offset

    def remove(self, qid: str) -> None:
        """Delete a message: the message file first, so a crash in between leaves no live entry."""
        _unlink(self._msg(qid))
        _unlink(self._state(qid))

    def lock(self, qid: str) -> int | None:
        """An exclusive lock on a message for one delivery (the fd; close it to unlock), or None if
        another process holds it or the message is gone."""
        try:
            fd = os.open(self._msg(qid), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not os.path.exists(self._msg(qid)):      # delivered and removed while we waited
            os.close(fd)
            return None
        return fd

    def stats(self) -> Stats:
        count = size = 0
        oldest: float | None = None
        for path in self.queue.iterdir():
            if not path.name.endswith(".msg"):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            count += 1
            size += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        return Stats(count, size, oldest)

    def entries(self) -> Iterator[tuple[Envelope, State]]:
        for qid in self.ids():
            try:
                env = self.envelope(qid)
                yield env, self.state(qid, env)
            except (FileNotFoundError, ValueError):
                continue

    def _msg(self, qid: str) -> Path:
        if not _ID.fullmatch(qid):
            raise FileNotFoundError(errno.ENOENT, f"no such queue id {qid!r}")
        return self.queue / f"{qid}.msg"

    def _state(self, qid: str) -> Path:
        return self.queue / f"{qid}.state"


def new_id(prefix: str = "") -> str:
    """A queue id that sorts by time and is unique across processes."""
    return f"{prefix}{int(time.time() * 1000):x}{os.getpid() % 0xffff:04x}{os.urandom(3).hex()}".upper()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
