"""Files by which a supervisor and its workers share server states and counts (``workers = N``).

In the run folder of one supervisor:

- ``control.json``: the server states the supervisor decides (checks, agent, slow start, operator
  words, held pools) and the last queue flush asked for, with a generation number; rewritten on
  every change, then SIGUSR1 to workers.
- ``ack-N``: worker N's PID and the last generation it applied; the supervisor waits for these
  before it answers an operator, so "drained" means every worker has stopped sending.
- ``counts-N.json``: worker N's sessions and per-server counts, rewritten every second, for the status.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_ack", "read_control", "read_counts", "write_ack", "write_control", "write_counts"]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_control(run_dir: Path, generation: int, pools: dict[str, Any],
                  flush: tuple[int, str | None] = (0, None)) -> None:
    """``flush``: (a number that grows with every operator's flush, its pool or None for all)."""
    _write(run_dir / "control.json", json.dumps({"generation": generation, "pools": pools,
                                                 "flush": {"seq": flush[0], "pool": flush[1]}}))


def read_control(run_dir: Path) -> dict[str, Any] | None:
    doc = _read_json(run_dir / "control.json")
    return doc if isinstance(doc, dict) else None


def write_ack(run_dir: Path, worker: int, generation: int) -> None:
    _write(run_dir / f"ack-{worker}", f"{os.getpid()} {generation}\n")


def read_ack(run_dir: Path, worker: int) -> tuple[int, int] | None:
    """(pid, generation) of worker ``worker``'s last acknowledgement, if any."""
    try:
        pid, generation = (run_dir / f"ack-{worker}").read_text().split()
        return int(pid), int(generation)
    except (OSError, ValueError):
        return None


def write_counts(run_dir: Path, worker: int, counts: dict[str, Any]) -> None:
    _write(run_dir / f"counts-{worker}.json", json.dumps(counts))


def read_counts(run_dir: Path, worker: int) -> dict[str, Any] | None:
    doc = _read_json(run_dir / f"counts-{worker}.json")
    return doc if isinstance(doc, dict) else None
