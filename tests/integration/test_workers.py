"""``workers = 2``: two processes share the listener; metrics add up; a dead worker comes back."""

from __future__ import annotations

import os
import re
import signal
import urllib.request

from support import pool_config, wait_for


def _worker_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"worker started worker=\d+ pid=(\d+)", log)]


def test_two_workers_serve_one_port_and_metrics_add_up(lab):
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(pool_config(a, b, top="workers = 2"))
    pids = wait_for(lambda: len(_worker_pids(vipd.log())) == 2 and _worker_pids(vipd.log()))
    sessions = [vipd.smtp() for _ in range(8)]
    for i, smtp in enumerate(sessions):
        smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {i}\r\n\r\nworker test {i}\r\n")
        smtp.quit()
    wait_for(lambda: len(a.messages()) + len(b.messages()) == 8)
    log = wait_for(lambda: vipd.log().count(" relayed ") == 8 and vipd.log())
    served_by = set(re.findall(r"vipd\[(\d)\]: \S+ relayed", log))
    assert served_by == {"0", "1"}, served_by          # the kernel spread the sessions over both
    text = urllib.request.urlopen(f"http://127.0.0.1:{vipd.admin_port}/metrics", timeout=10).read().decode()
    assert 'vipd_messages_total{outcome="relayed"} 8.0' in text
    assert 'vipd_sessions_total{listener="mx"} 8.0' in text
    assert all(p > 0 for p in pids)


def test_a_killed_worker_is_restarted_and_sigterm_stops_all(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, top="workers = 2"))
    first = wait_for(lambda: len(_worker_pids(vipd.log())) == 2 and _worker_pids(vipd.log()))
    os.kill(first[0], signal.SIGKILL)
    pids = wait_for(lambda: len(_worker_pids(vipd.log())) == 3 and _worker_pids(vipd.log()), timeout=15)
    assert "worker died, restarting" in vipd.log()
    for i in range(4):
        with vipd.smtp() as smtp:
            smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {i}\r\n\r\nafter restart\r\n")
    assert len(wait_for(lambda: len(a.messages()) == 4 and a.messages())) == 4
    assert vipd.proc.stop() == 0
    for pid in pids[1:]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_workers_stop_when_the_supervisor_is_killed(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, top="workers = 2"))
    pids = wait_for(lambda: len(_worker_pids(vipd.log())) == 2 and _worker_pids(vipd.log()))
    vipd.proc.kill()

    def gone(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(p) for p in pids), timeout=15, what="orphaned workers to stop")
    # A killed supervisor cannot remove its run folder; the next one to start removes it.
    import tempfile
    from pathlib import Path
    from vipd.net.workers import sweep_stale_run_dirs
    vipd.proc.popen.wait(10)
    left = list(Path(tempfile.gettempdir()).glob(f"vipd-run-{vipd.proc.popen.pid}-*"))
    assert len(left) == 1 and (left[0] / "metrics").is_dir()
    assert left[0] in sweep_stale_run_dirs(Path(tempfile.gettempdir()))
    assert not left[0].exists()


def test_states_and_operator_changes_reach_every_worker(lab):
    from prometheus_client.parser import text_string_to_metric_families

    from support import Admin, health_config
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd("workers = 2\n" + health_config([a, b]))
    wait_for(lambda: len(_worker_pids(vipd.log())) == 2)
    admin = Admin(vipd.admin_port)
    assert admin.status()["workers"] == 2

    def send_many(prefix: str, n: int) -> None:
        for i in range(n):
            with vipd.smtp() as smtp:
                smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {prefix}{i}\r\n\r\nx\r\n")

    # The supervisor answers only when both workers have applied the drain.
    admin.vipctl("server", "drain", "incoming/a")
    before = len(a.messages())
    send_many("drained", 10)
    assert len(a.messages()) == before
    assert len(b.messages()) == 10
    # Both workers served some of them, and so both really obeyed (their log lines come in batches).
    wait_for(lambda: set(re.findall(r"vipd\[(\d)\]: \S+ relayed", vipd.log())) == {"0", "1"})
    admin.vipctl("server", "ready", "incoming/a")
    admin.vipctl("pool", "hold", "incoming")
    for _ in range(4):                  # whichever worker takes the session, the pool is held
        with vipd.smtp() as smtp:
            smtp.ehlo()
            assert smtp.docmd("MAIL FROM:<a@example.org>")[0] == 250
            assert smtp.docmd("RCPT TO:<b@example.com>")[0] == 451
    admin.vipctl("pool", "release", "incoming")
    send_many("released", 4)
    assert len(a.messages()) + len(b.messages()) == 14

    # The picks of both workers add up in the status; the supervisor's checks decide the states.
    wait_for(lambda: sum(s["selected"] for s in admin.pool("incoming")["servers"]) >= 14, what="counts")
    b.proc.stop()
    wait_for(lambda: admin.server("incoming", "b")["state"] == "down", timeout=10, what="b down")
    text = admin.get("/metrics").decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), "a metric family exported twice"
    assert 'vipd_server_state{pool="incoming",server="b",state="down"} 1.0' in text
    assert vipd.log().count("server down pool=incoming server=b") == 1   # said once, by the supervisor
