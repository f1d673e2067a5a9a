"""The spool's files: durable writes, recovery after a crash, locks, state, statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vipd.spool import store as store_mod
from vipd.spool.store import Envelope, Spool, SpoolError, State, new_id


def envelope(qid: str = "Q1", **kw) -> Envelope:
    return Envelope(id=qid, pool="p", sender="a@example.org", recipients=("b@example.com", "c@example.com"),
                    arrival=1_700_000_000.0, **kw)


def test_put_then_read_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    written = spool.put(envelope(client_ip="192.0.2.1", helo="h.example"), [b"Received: x\r\n", b"\r\nbody\r\n"])
    assert written == len(b"Received: x\r\n\r\nbody\r\n")
    assert spool.ids() == ["Q1"]
    env = spool.envelope("Q1")
    assert (env.sender, env.recipients, env.client_ip, env.helo) == ("a@example.org", ("b@example.com", "c@example.com"),
                                                                     "192.0.2.1", "h.example")
    f, offset = spool.open_data("Q1")
    with f:
        f.seek(offset)
        assert f.read() == b"Received: x\r\n\r\nbody\r\n"
    assert spool.state("Q1").remaining == ["b@example.com", "c@example.com"]
    assert list(spool.tmp.iterdir()) == []
    stats = spool.stats()
    assert stats.messages == 1 and stats.bytes > written


def test_state_round_trips_and_a_torn_state_starts_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(), [b"x\r\n"])
    spool.save_state("Q1", State(["c@example.com"], attempts=3, last_error="451 4.4.1 no", held=True))
    state = spool.state("Q1")
    assert (state.remaining, state.attempts, state.held) == (["c@example.com"], 3, True)
    (spool.queue / "Q1.state").write_text('{"remaining": ["c@exa')        # cut short by a crash
    assert spool.state("Q1").remaining == ["b@example.com", "c@example.com"]


def test_a_failed_write_leaves_nothing_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", broken_fsync)
    with pytest.raises(SpoolError, match="No space left"):
        spool.put(envelope(), [b"x\r\n"])
    assert spool.ids() == [] and list(spool.tmp.iterdir()) == []


def test_a_failed_directory_sync_takes_the_message_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    monkeypatch.setattr(store_mod, "fsync_dir", lambda path: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(SpoolError):
        spool.put(envelope(), [b"x\r\n"])
    assert spool.ids() == []              # renamed but not durable: not acknowledged, not delivered


def test_recover_removes_dead_writers_temp_files_and_orphan_states(tmp_path: Path) -> None:
    Spool(tmp_path).put(envelope("KEEP"), [b"x\r\n"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_dir = tmp_path / "tmp" / dead.stdout.strip()
    dead_dir.mkdir()
    (dead_dir / "HALF").write_bytes(b'{"id": "HALF"')
    (tmp_path / "queue" / "GONE.state").write_text("{}")
    live_dir = tmp_path / "tmp" / str(os.getppid())     # a live process's write in progress stays
    live_dir.mkdir(exist_ok=True)
    (live_dir / "BUSY").write_bytes(b"...")
    assert Spool(tmp_path).recover() == ["KEEP"]
    assert not dead_dir.exists()
    assert not (tmp_path / "queue" / "GONE.state").exists()
    assert (live_dir / "BUSY").exists()


def test_one_lock_at_a_time_and_none_for_a_removed_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(), [b"x\r\n"])
    fd = spool.lock("Q1")
    assert fd is not None
    # flock locks belong to the open file: a second open, as another process would do, is refused.
    assert spool.lock("Q1") is None
    os.close(fd)
    fd = spool.lock("Q1")
    assert fd is not None
    spool.remove("Q1")
    os.close(fd)
    assert spool.lock("Q1") is None and spool.ids() == []


def test_ids_are_unique_and_safe() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(store_mod._ID.fullmatch(i) for i in ids)
    with pytest.raises(ValueError):
        Spool.put(Spool.__new__(Spool), envelope("../etc"), [])
