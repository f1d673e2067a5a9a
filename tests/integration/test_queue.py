"""The durable failover queue with real processes: held pools, dead pools, kill -9, a full disk, bounces.

Every test counts messages by a tag in their Subject, so "every acknowledged message arrived exactly
once" is checked message by message, not by totals.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from support import Admin, Lab, Sink, Vipd, health_config, wait_for

QUEUE = "[queue]\nretry_min_seconds = 0.5\nretry_max_seconds = 2\n"


def spooled(tmp: Path, extra: str = "") -> str:
    return f'spool_dir = "{tmp / "spool"}"\n'


def config(lab: Lab, sinks: list[Sink], queue: str = QUEUE, **kw) -> str:
    return spooled(lab.tmp) + health_config(sinks, **kw) + queue


def send(vipd: Vipd, tag: str, body: str = "hello") -> tuple[int, str]:
    """One message on its own connection: the final reply (code, text), or the refusal."""
    try:
        with smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.test", timeout=60) as s:
            s.ehlo()
            code, text = s.mail("sender@example.org")
            if code != 250:
                return code, text.decode()
            code, text = s.rcpt("rcpt@example.com")
            if code >= 300:
                return code, text.decode()
            code, text = s.data(f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n{body}\r\nend of {tag}\r\n".encode())
            return code, text.decode()
    except (smtplib.SMTPException, OSError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def tags(sinks: list[Sink]) -> Counter:
    """How often each tag arrived, over all sinks; asserts every stored message is whole."""
    out: Counter = Counter()
    for sink in sinks:
        for m in sink.messages():
            tag = m.body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            assert m.body.rstrip(b"\r\n").endswith(f"end of {tag}".encode()), f"{tag} is not whole"
            out[tag] += 1
    return out


def queue_files(lab: Lab) -> list[Path]:
    folder = lab.tmp / "spool" / "queue"
    return sorted(folder.glob("*.msg")) if folder.exists() else []


class Senders:
    """``n`` clients sending one message per connection until stopped; every reply kept by tag."""

    def __init__(self, vipd: Vipd, n: int, prefix: str) -> None:
        self.vipd, self.prefix = vipd, prefix
        self.replies: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            tag = f"{self.prefix}-{index}-{n}"
            reply = send(self.vipd, tag)
            with self._lock:
                self.replies[tag] = reply
            n += 1

    def __enter__(self) -> Senders:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def acked(self) -> set[str]:
        with self._lock:
            return {t for t, (code, _) in self.replies.items() if code == 250}

    def count(self) -> int:
        with self._lock:
            return len(self.replies)


@pytest.mark.parametrize("workers", [1, 2])
def test_hold_200_then_release_all_arrive_exactly_once(lab: Lab, workers: int) -> None:
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(f"workers = {workers}\n" + config(lab, [a, b]))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    admin.vipctl("pool", "hold", "incoming")
    results: dict[str, tuple[int, str]] = {}

    def client(index: int) -> None:
        for n in range(50):
            results[f"held-{index}-{n}"] = send(vipd, f"held-{index}-{n}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 200
    bad = {t: r for t, r in results.items() if r[0] != 250 or "queued as" not in r[1]}
    assert not bad, list(bad.items())[:3]
    assert tags([a, b]) == Counter()                  # held: nothing went out
    assert len(queue_files(lab)) == 200
    assert admin.metric("vipd_spool_messages") == 200
    admin.vipctl("pool", "release", "incoming")
    got = wait_for(lambda: (t := tags([a, b])) and sum(t.values()) >= 200 and t, timeout=60,
                   what="all 200 to arrive")
    assert set(got) == set(results) and set(got.values()) == {1}
    wait_for(lambda: not queue_files(lab), what="the queue to empty")
    assert admin.metric("vipd_spool_messages") == 0
    assert admin.metric("vipd_spool_deliveries_total", pool="incoming") == 200


def test_every_server_of_a_pool_stopped_under_load(lab: Lab) -> None:
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(config(lab, [a, b]))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    with Senders(vipd, 4, "load") as senders:
        wait_for(lambda: senders.count() > 40, what="load")
        a.proc.stop()
        b.proc.stop()
        stopped = time.monotonic()
        wait_for(lambda: time.monotonic() - stopped > 10, timeout=30, what="10 s without servers")
        queued = len(queue_files(lab))
        a, b = lab.restart_sink(a), lab.restart_sink(b)
        wait_for(lambda: senders.count() > 40 + queued + 40, timeout=60, what="load after the restart")
    acked = senders.acked()
    assert queued > 0
    got = wait_for(lambda: (t := tags([a, b])) and acked <= set(t) and t, timeout=60,
                   what="every acknowledged message to arrive")
    duplicates = sum(n - 1 for n in got.values())
    print(f"acknowledged {len(acked)}, queued while down {queued}, duplicates {duplicates}")
    assert duplicates == 0, {t: n for t, n in got.items() if n > 1}
    wait_for(lambda: admin.metric("vipd_spool_messages") == 0, timeout=30, what="the queue to empty")


def test_kill_9_while_20_clients_send_then_restart(lab: Lab) -> None:
    a = lab.sink("a")
    a.proc.stop()                           # the pool is down: everything goes to the queue
    text = config(lab, [a])
    vipd = lab.vipd(text)
    with Senders(vipd, 20, "k9") as senders:
        wait_for(lambda: len(senders.acked()) > 60, timeout=60, what="queued messages")
        vipd.proc.popen.send_signal(signal.SIGKILL)
        vipd.proc.popen.wait(10)
    acked = senders.acked()
    files = queue_files(lab)
    assert len(files) >= len(acked)         # acknowledged means on disk
    a = lab.restart_sink(a)
    again = lab.vipd(text, name="vipd-again")
    got = wait_for(lambda: (t := tags([a])) and acked <= set(t) and t, timeout=90,
                   what="every acknowledged message after the restart")
    # Whatever was written in full but not yet acknowledged may arrive too (the client retries it);
    # nothing else, and nothing in pieces (tags() checks every body is whole).
    assert set(got) <= set(senders.replies)
    assert set(got.values()) == {1}
    wait_for(lambda: not queue_files(lab), what="the queue to empty")
    wait_for(lambda: "queue recovered" in again.log(), what="the log line")


def test_a_full_spool_gets_452_and_never_250(lab: Lab) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    spool = lab.tmp / "spool"
    spool.mkdir()
    a = lab.sink("a")
    # A real full file system: a 256 KiB tmpfs in vipd's own mount namespace, gone with it.
    wrap = ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {spool} && exec {{cmd}}"]
    vipd = lab.vipd(config(lab, [a]), wrap=wrap)
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    admin.vipctl("pool", "hold", "incoming")
    big = "x" * 998 + "\r\n"
    results = {f"full-{i}": send(vipd, f"full-{i}", big * 40) for i in range(12)}   # 40 KB each
    codes = Counter(code for code, _ in results.values())
    assert set(codes) <= {250, 452}, results
    assert codes[452] > 0 and codes[250] > 0, codes
    for code, text in results.values():
        if code == 452:
            assert text.startswith("4.3.1")
    wait_for(lambda: "spool write failed" in vipd.log(), what="the log line")
    admin.vipctl("pool", "release", "incoming")
    acked = {t for t, (code, _) in results.items() if code == 250}
    got = wait_for(lambda: (t := tags([a])) and set(t) >= acked and t, timeout=30, what="the acknowledged ones")
    assert set(got) == acked                # a 452 message never went anywhere


def test_a_message_past_queue_return_bounces_with_a_dsn(lab: Lab) -> None:
    z = lab.sink("z")
    dead = lab.sink("dead")
    dead.proc.stop()
    queue = ("[queue]\nretry_min_seconds = 0.3\nretry_max_seconds = 0.5\nwarn_seconds = 1\nreturn_seconds = 3\n"
             'bounce_pool = "bounces"\n')
    text = config(lab, [dead], queue=queue) + f'\n[pool.bounces]\nservers = ["{z.address}"]\n'
    vipd = lab.vipd(text)
    code, reply = send(vipd, "doomed")
    assert code == 250 and "queued as" in reply
    qid = reply.rsplit(" ", 1)[1]
    delay, dsn = wait_for(lambda: len(z.messages()) >= 2 and z.messages(), timeout=20, what="two notices")
    assert b"Subject: Delayed Mail" in delay.body and b"Action: delayed" in delay.body
    assert dsn.envelope["mail_from"] == ""                    # notifications come from <>
    assert dsn.envelope["rcpt_to"] == ["sender@example.org"]
    msg = email.message_from_bytes(dsn.body, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    recipient = blocks[1]
    assert recipient["Action"] == "failed"
    assert recipient["Final-Recipient"] == "rfc822; rcpt@example.com"
    assert recipient["Status"].startswith("4.4.") or recipient["Status"].startswith("5.")
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "X-Tag: doomed" in parts[2].get_content()
    wait_for(lambda: not [f for f in queue_files(lab)], timeout=10, what="the queue to empty")
    wait_for(lambda: f"{qid}: returned" in vipd.log(), what="the log line")


def test_operators_list_show_hold_release_delete_bounce_flush(lab: Lab) -> None:
    a = lab.sink("a")
    vipd = lab.vipd(config(lab, [a]))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    admin.vipctl("pool", "hold", "incoming")
    ids = {}
    for tag in ("keep", "drop", "back"):
        code, text = send(vipd, tag)
        assert code == 250
        ids[tag] = text.rsplit(" ", 1)[1]
    listing = admin.vipctl("queue", "list").stdout
    assert "-- 3 messages" in listing
    assert all(qid in listing for qid in ids.values())
    assert "<sender@example.org>" in listing and "rcpt@example.com" in listing

    assert admin.vipctl("queue", "hold", ids["keep"]).stdout == f"queue {ids['keep']}: held\n"
    assert f"{ids['keep']}!" in admin.vipctl("queue", "list").stdout
    shown = admin.vipctl("queue", "show", ids["keep"]).stdout
    assert "X-Tag: keep" in shown and "held: True" in shown
    assert admin.vipctl("queue", "delete", ids["drop"]).stdout == f"queue {ids['drop']}: deleted\n"
    assert admin.vipctl("queue", "bounce", ids["back"]).stdout == f"queue {ids['back']}: bounced\n"
    out = admin.vipctl("queue", "show", "NOSUCHID", check=False)
    assert out.returncode == 1 and "404" in out.stderr

    admin.vipctl("pool", "release", "incoming")
    # The bounce (to sender@example.org, routed to the only pool) goes out; the held one waits.
    wait_for(lambda: any(m.envelope["mail_from"] == "" for m in a.messages()), what="the bounce")
    time.sleep(1.5)                                     # a flush would have sent the held one by now
    assert [m for m in a.messages() if b"X-Tag: keep" in m.body] == []
    admin.vipctl("queue", "release", ids["keep"])
    wait_for(lambda: any(b"X-Tag: keep" in m.body for m in a.messages()), what="the released one")
    assert not any(b"X-Tag: drop" in m.body for m in a.messages())
    assert admin.vipctl("queue", "list").stdout == "queue is empty\n"
    assert admin.vipctl("queue", "flush").stdout == "queue flush: 0 message(s) due now\n"
    log = vipd.log()
    for action in ("hold", "delete", "bounce", "release"):
        assert "admin queue id=" in log and f"action={action}" in log, action


def test_over_queue_load_mail_is_queued_then_delivered(lab: Lab) -> None:
    if os.getloadavg()[0] <= 0.0:
        pytest.skip("the load average is exactly 0: no threshold is below it")
    a = lab.sink("a")
    text = config(lab, [a]).replace('default_pool = "incoming"', 'default_pool = "incoming"\nqueue_load = 0.000001')
    vipd = lab.vipd(text)
    code, reply = send(vipd, "busy")
    assert code == 250 and "queued as" in reply
    wait_for(lambda: tags([a]) == Counter({"busy": 1}), what="delivery from the queue")
    wait_for(lambda: "why=queue_load" in vipd.log(), what="the log line")


def test_per_recipient_results_a_5xx_bounces_and_the_rest_is_delivered(lab: Lab) -> None:
    a = lab.sink("a", "--reject-rcpt", "^nobody@")
    vipd = lab.vipd(config(lab, [a]))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    admin.vipctl("pool", "hold", "incoming")
    with smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        s.mail("sender@example.org")
        assert s.rcpt("rcpt@example.com")[0] == 250
        assert s.rcpt("nobody@example.com")[0] == 250      # the pool is held: the queue accepts both
        code, text = s.data(b"Subject: split\r\nX-Tag: split\r\n\r\nhello\r\nend of split\r\n")
    assert code == 250
    admin.vipctl("pool", "release", "incoming")
    # The message reaches rcpt@, nobody@ is refused for good: its sender gets a bounce (through the
    # same pool, which accepts sender@example.org), and the entry leaves the queue.
    messages = wait_for(lambda: len(a.messages()) >= 2 and a.messages(), what="delivery and bounce")
    delivered = [m for m in messages if m.envelope["mail_from"] == "sender@example.org"]
    bounces = [m for m in messages if m.envelope["mail_from"] == ""]
    assert [m.envelope["rcpt_to"] for m in delivered] == [["rcpt@example.com"]]
    assert len(bounces) == 1 and b"Final-Recipient: rfc822; nobody@example.com" in bounces[0].body
    assert b"Status: 5.1.1" in bounces[0].body
    wait_for(lambda: not queue_files(lab), what="the queue to empty")
