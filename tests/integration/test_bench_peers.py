"""Each bench peer (bench/peers.py) for real: installed, started in front of two sinks, 20 messages
through it with smtplib, all of them arrive, and stop() leaves no process behind.

Slow and installs packages (apt-get, npm, pip): runs only with VIPD_BENCH_PEERS=1, never in CI by
default. The install cache is VIPD_BENCH_CACHE (default ~/.cache/vipd-bench).
"""

from __future__ import annotations

import os
import re
import smtplib
import sys
from pathlib import Path

import pytest

from support import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import PEERS, _alive, _tree  # noqa: E402
from bench.system import Endpoint, Unavailable  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VIPD_BENCH_PEERS") != "1",
                       reason="bench peers install packages and run real MTAs: set VIPD_BENCH_PEERS=1"),
]

#: peers that cannot spread over two host:port sinks (see the sendmail.mc comment)
SINGLE_SINK = {"sendmail"}
N = 20


@pytest.fixture(scope="module")
def cache() -> Path:
    path = Path(os.environ.get("VIPD_BENCH_CACHE", Path.home() / ".cache" / "vipd-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("peer", PEERS, ids=[p.name for p in PEERS])
def test_peer_relays_every_message_and_stops_cleanly(peer, cache, lab, tmp_path):
    try:
        peer.prepare(cache)
    except Unavailable as exc:
        pytest.skip(f"{peer.name} unavailable here: {exc}")
    assert peer.version()
    a, b = lab.sink("a", "--no-fsync", "--quiet"), lab.sink("b", "--no-fsync", "--quiet")
    ep = peer.start(tmp_path / "work", [Endpoint("127.0.0.1", a.port), Endpoint("127.0.0.1", b.port)])
    try:
        tree = [p for root in peer.pids() for p in _tree(root)]
        assert tree, "no processes"
        for s in range(4):
            with smtplib.SMTP(ep.host, ep.port, local_hostname="client.test", timeout=30) as smtp:
                for m in range(5):
                    k = s * 5 + m
                    smtp.sendmail(f"from{k}@sender.example", [f"rcpt{k}@dest.example"],
                                  f"Subject: msg {k}\r\nMessage-ID: <m{k}@bench.test>\r\n\r\nbody {k}\r\n")
        wait_for(lambda: len(a.messages()) + len(b.messages()) >= N, timeout=60, what=f"{N} messages")
        got = a.messages() + b.messages()
        assert sorted(int(re.search(rb"Subject: msg (\d+)", m.body).group(1)) for m in got) == list(range(N))
        assert all(m.envelope["rcpt_to"] and m.envelope["rcpt_to"][0].startswith("rcpt") for m in got)
        if peer.name not in SINGLE_SINK:
            assert a.messages() and b.messages(), "not spread over both sinks"
        tree = [p for root in peer.pids() for p in _tree(root)]  # with the per-session children
    finally:
        peer.stop()
    assert peer.pids() == []
    assert not [pid for pid, start in tree if _alive(pid, start)], "processes left after stop()"
