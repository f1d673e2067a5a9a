"""The operator's words kept on disk (``state_file``): held pools, servers' admin states and runtime weights.

Why: they are the shut-off valve and the drain. A restart that forgot a hold would send mail to a
gateway under maintenance; HAProxy keeps the same in its server-state-file for the same reason. The
file is rewritten after every operator change (temp file, fsync, rename, fsync of the folder) and
read once at start; a SIGHUP reload keeps the live states anyway. What the checks and the agent
decide is not kept: they look again for themselves.

The file is JSON, small and meant to be read by people too::

    {"version": 1, "pools": {"gateway": {"held": true, "servers": {"gw-2": {"admin": "maint"}}}}}

Only what differs from the configuration is in it: a pool that is not held and whose servers are
all ``ready`` at their configured weight is left out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .balance import ADMIN_STATES, MAX_WEIGHT
from .durable import write_durably

__all__ = ["StateFileError", "keep", "load", "restore", "restore_from", "snapshot"]

VERSION = 1


class StateFileError(ValueError):
    """The state file cannot be read or is not one of ours; the message names the file."""


def snapshot(pools: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's part of the live state of ``pools`` (name -> vipd.net.pools.PoolRuntime)."""
    out: dict[str, Any] = {}
    for name, pool in pools.items():
        servers = {}
        for backend in pool.balancer.backends:
            words: dict[str, Any] = {}
            if backend.admin != "ready":
                words["admin"] = backend.admin
            if backend.weight_override is not None:
                words["weight"] = backend.weight_override
            if words:
                servers[backend.name] = words
        if pool.balancer.held or servers:
            out[name] = {"held": bool(pool.balancer.held), "servers": servers}
    return {"version": VERSION, "pools": out}


def _encode(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def load(path: Path) -> dict[str, Any] | None:
    """The saved document, or None when there is no file yet; StateFileError when it is unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path}: cannot read: {exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StateFileError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("pools"), dict):
        raise StateFileError(f'{path}: not a vipd state file (expected {{"version": {VERSION}, "pools": {{...}}}})')
    return doc


def restore_from(path: Path | None, pools: Mapping[str, Any], log: Any) -> None:
    """At start: apply the saved operator state to ``pools`` and log each line. An unusable file is
    logged as an error and left alone (it is not overwritten until the next operator change)."""
    if path is None:
        return
    try:
        doc = load(path)
    except StateFileError as exc:
        log.error(f"state_file ignored: {exc}")
        return
    for line in restore(pools, doc or {}):
        log.info(f"state_file {line}")
    log.flush()


async def keep(path: Path | None, pools: Mapping[str, Any], log: Any, lock: asyncio.Lock) -> None:
    """After an operator change: save, or log why not (the change itself stays applied). The state is
    taken on the event loop, the fsyncs run in a thread (a slow disk must not stall the sessions),
    and one save at a time under the caller's ``lock``, so that the last change is the one on disk."""
    if path is None:
        return
    try:
        async with lock:
            await asyncio.to_thread(write_durably, Path(path), _encode(snapshot(pools)))
    except OSError as exc:
        log.error(f"state_file not saved: {path}: {exc}; the change holds until vipd restarts")
        log.flush()


def restore(pools: Mapping[str, Any], doc: Mapping[str, Any], who: str = "state_file") -> list[str]:
    """Apply a loaded document to ``pools``; what was applied and what was skipped, a line each."""
    said: list[str] = []
    for name, saved in doc.get("pools", {}).items():
        pool = pools.get(name)
        if pool is None or not isinstance(saved, dict):
            said.append(f"skipped pool={name} reason=\"not in the configuration\"")
            continue
        if saved.get("held") is True:
            pool.set_held(True)
            said.append(f"restored pool={name} held=true")
        known = {b.name for b in pool.balancer.backends}
        for server, words in (saved.get("servers") or {}).items():
            if server not in known or not isinstance(words, dict):
                said.append(f"skipped pool={name} server={server} reason=\"not in the configuration\"")
                continue
            admin, weight = words.get("admin"), words.get("weight")
            if admin in ADMIN_STATES:
                pool.set_admin(server, admin, who)
                said.append(f"restored pool={name} server={server} admin={admin}")
            if isinstance(weight, int) and not isinstance(weight, bool) and 0 <= weight <= MAX_WEIGHT:
                pool.set_weight(server, weight, who)
                said.append(f"restored pool={name} server={server} weight={weight}")
    return said
