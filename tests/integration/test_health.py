"""Health in a running vipd: active checks, the agent, passive ejection, operator control, held pools.

Real processes throughout: sinks, ``vipd-agent`` agents reading load files, vipd, and the real
``vipctl``. Where a test needs a bound on time it is generous (fall x interval plus seconds of slack),
because the machine is shared and noisy; speed itself is measured in bench/, not here.
"""

from __future__ import annotations

import email.policy
import smtplib
import socket
import threading
import time
from collections import Counter
from email.message import EmailMessage

import pytest

from support import Admin, Lab, Sink, Vipd, health_config as config, wait_for

from support import CHECK_FALL as FALL, CHECK_INTERVAL as INTERVAL, CHECK_RISE as RISE

SLACK = 8.0


def message(tag: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@client.test", "b@example.com", tag
    msg["X-Tag"] = tag
    msg.set_content(f"message {tag}\n")
    return msg


def send(vipd: Vipd, tag: str) -> tuple[int, str]:
    """One message on its own connection; the final reply (code, text) or the refusal."""
    try:
        with vipd.smtp() as s:
            s.send_message(message(tag))
            return 250, ""
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text.decode()
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")


def landed(sinks: list[Sink], prefix: str) -> Counter:
    """Per sink name: messages whose tag starts with ``prefix``."""
    out: Counter = Counter()
    for sink in sinks:
        for m in sink.messages():
            subject = m.body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            if subject.startswith(prefix):
                out[sink.name] += 1
    return out


class Load:
    """Steady load: ``threads`` clients sending one message per connection until stopped."""

    def __init__(self, vipd: Vipd, threads: int = 4) -> None:
        self.vipd = vipd
        self.results: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self._lock = threading.Lock()

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            tag = f"load-{index}-{n}"
            code, text = send(self.vipd, tag)
            with self._lock:
                self.results.append((tag, code, text))
            n += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_more(self, n: int) -> None:
        target = self.count() + n
        wait_for(lambda: self.count() >= target, timeout=60, what=f"{n} more messages")


def test_stop_one_of_three_under_load(lab: Lab) -> None:
    sinks = [lab.sink(n) for n in ("a", "b", "c")]
    vipd = lab.vipd(config(sinks))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    c = sinks[2]
    with Load(vipd) as load:
        load.wait_more(30)
        c.proc.stop()
        # The first failed connection holds it off at once (passive); the checks then mark it down.
        wait_for(lambda: admin.server("incoming", "c")["health"] == "down", timeout=FALL * INTERVAL + SLACK,
                 what="the checks to mark c down")
        picked = admin.server("incoming", "c")["selected"]
        load.wait_more(40)
        # Down means no new transactions, whatever the load.
        assert admin.server("incoming", "c")["selected"] == picked
        assert admin.server("incoming", "c")["state"] == "down"
        c = lab.restart_sink(c)
        wait_for(lambda: admin.server("incoming", "c")["state"] == "up", timeout=RISE * INTERVAL + SLACK,
                 what="c to come back")
        before = len(c.messages())
        wait_for(lambda: len(c.messages()) > before + 3, timeout=60, what="c to get messages again")
    errors = [r for r in load.results if r[1] != 250]
    assert not errors, errors[:5]
    wait_for(lambda: "server up pool=incoming server=c was=down" in vipd.log(), what="the log line")
    assert admin.server("incoming", "c")["check"]["ok"] is True
    # Every acknowledged message is stored somewhere.
    stored = sum(landed([sinks[0], sinks[1], c], "load-").values())
    assert stored >= len(load.results)


def test_agent_load_drains_then_downs_then_ramps_up(lab: Lab) -> None:
    sinks = [lab.sink(n) for n in ("a", "b")]
    agents = {s.name: lab.agent(f"agent-{s.name}", load=1.0) for s in sinks}
    health = (f"interval_seconds = {INTERVAL}, rise = {RISE}, fall = {FALL}, slowstart_seconds = 4")
    vipd = lab.vipd(config(sinks, health, agents={n: a.port for n, a in agents.items()}))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    # Load 1 against queue_load 8: 100 - ceil(99 / 8) = 87%.
    wait_for(lambda: admin.server("incoming", "a")["agent"] == "ready up 87%", what="the agent's first word")
    assert admin.server("incoming", "a")["effective_weight"] == 0.87

    # A transaction in flight on one server, started before the drain.
    held = vipd.smtp()
    held.ehlo()
    held.mail("a@client.test")
    held.rcpt("b@example.com")
    busy = wait_for(lambda: [s["name"] for s in admin.pool("incoming")["servers"] if s["active"] == 1],
                    what="the held transaction to reach a server")[0]
    other = "b" if busy == "a" else "a"
    agents[busy].set_load(9.0)                                  # above queue_load
    wait_for(lambda: admin.server("incoming", busy)["state"] == "drain", timeout=SLACK, what="drain")
    for i in range(6):
        assert send(vipd, f"drain-{i}")[0] == 250
    assert landed(sinks, "drain-") == {other: 6}
    # The transaction that started before the drain completes on its server.
    code, _ = held.data(message("in-flight").as_bytes(policy=email.policy.SMTP))
    held.quit()
    assert code == 250
    assert landed(sinks, "in-flight") == {busy: 1}

    agents[busy].set_load(13.0)                                 # above refuse_load
    wait_for(lambda: admin.server("incoming", busy)["state"] == "down", timeout=SLACK, what="down")
    assert send(vipd, "down-0")[0] == 250
    assert landed(sinks, "down-") == {other: 1}

    agents[busy].set_load(0.5)
    wait_for(lambda: admin.server("incoming", busy)["state"] == "up", timeout=SLACK, what="up again")
    ramp = [admin.server("incoming", busy)["ramp_percent"]]
    wait_for(lambda: ramp.append(admin.server("incoming", busy)["ramp_percent"]) or ramp[-1] == 100,
             timeout=SLACK + 4, what="the ramp to finish")
    assert ramp[0] < 100 and ramp == sorted(ramp), ramp
    for i in range(10):
        assert send(vipd, f"after-{i}")[0] == 250
    assert landed(sinks, "after-")[busy] > 0


def test_operator_drain_ready_hold_release(lab: Lab) -> None:
    sinks = [lab.sink(n) for n in ("a", "b")]
    vipd = lab.vipd(config(sinks))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]

    out = admin.vipctl("server", "drain", "incoming/a")
    assert out.stdout.startswith("server incoming/a: drain (admin drain")
    row = next(ln for ln in admin.vipctl("show").stdout.splitlines() if ln.strip().startswith("a "))
    assert row.split()[2:4] == ["DRAIN", "drain"]
    assert admin.metric("vipd_server_state", pool="incoming", server="a", state="drain") == 1
    assert admin.metric("vipd_server_up", pool="incoming", server="a") == 0
    for i in range(6):
        assert send(vipd, f"drained-{i}")[0] == 250
    assert landed(sinks, "drained-") == {"b": 6}

    admin.vipctl("server", "ready", "incoming/a")
    assert admin.metric("vipd_server_state", pool="incoming", server="a", state="up") == 1
    for i in range(6):
        assert send(vipd, f"ready-{i}")[0] == 250
    assert landed(sinks, "ready-") == {"a": 3, "b": 3}

    assert admin.vipctl("pool", "hold", "incoming").stdout == "pool incoming: held\n"
    assert "HELD" in admin.vipctl("show").stdout
    assert admin.metric("vipd_pool_held", pool="incoming") == 1
    code, text = send(vipd, "held-0")
    # Until the durable queue exists a held pool defers: a 4xx, so the client keeps the message.
    assert code == 451 and text.startswith("4.4.1"), (code, text)
    assert landed(sinks, "held-") == {}
    admin.vipctl("pool", "release", "incoming")
    assert admin.metric("vipd_pool_held", pool="incoming") == 0
    assert send(vipd, "released-0")[0] == 250

    admin.vipctl("server", "weight", "incoming/a", "3")
    assert admin.server("incoming", "a")["effective_weight"] == 3
    for i in range(8):
        assert send(vipd, f"weighted-{i}")[0] == 250
    assert landed(sinks, "weighted-") == {"a": 6, "b": 2}
    admin.vipctl("server", "weight", "incoming/a", "config")
    assert admin.server("incoming", "a")["weight"] == 1

    log = vipd.log()
    for change in ("server=a admin=drain", "server=a admin=ready", "held=true", "held=false",
                   "server=a weight=3", "server=a weight=config"):
        assert f"admin change pool=incoming {change} by=127.0.0.1" in log, change
    assert "server drain pool=incoming server=a was=up" in log


def test_vipctl_reports_mistakes(lab: Lab) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(config([sink]))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    out = admin.vipctl("server", "drain", "incoming/nope", check=False)
    assert out.returncode == 1
    assert "404: no server 'nope' in pool 'incoming' (servers: a)" in out.stderr
    out = admin.vipctl("pool", "hold", "elsewhere", check=False)
    assert (out.returncode, out.stderr.strip()) == (1, "vipctl: 404: no pool 'elsewhere' (pools: incoming)")
    out = admin.vipctl("server", "weight", "incoming/a", "999", check=False)
    assert out.returncode == 1 and "weight must be an integer 0..256" in out.stderr
    out = admin.vipctl("server", "drain", "no-slash", check=False)
    assert out.returncode == 2 and "expected POOL/SERVER" in out.stderr
    assert admin.server("incoming", "a")["state"] == "up"


def test_token_is_required_when_configured(lab: Lab) -> None:
    token = "t0ken-for-the-admin-api"
    sink = lab.sink("a")
    vipd = lab.vipd(config([sink], admin_extra=f'token = "{token}"'))
    anonymous = Admin(vipd.admin_port)  # type: ignore[arg-type]
    out = anonymous.vipctl("server", "drain", "incoming/a", check=False)
    assert out.returncode == 1 and "401" in out.stderr
    with pytest.raises(Exception, match="401"):
        anonymous.status()
    assert b"<html" in anonymous.get("/").lower()       # the page itself holds no data
    admin = Admin(vipd.admin_port, token)  # type: ignore[arg-type]
    admin.vipctl("server", "drain", "incoming/a")
    assert admin.server("incoming", "a")["state"] == "drain"
    assert "admin refused path=/api/pools/incoming/servers/a" in vipd.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_changes_the_token_but_never_drops_it_from_an_open_listener(lab: Lab, workers: int) -> None:
    import signal
    old, new = "the-old-admin-token", "the-new-admin-token"
    sink = lab.sink("a")
    text = f"workers = {workers}\n" + config([sink], admin_extra=f'token = "{old}"')
    vipd = lab.vipd(text)
    vipd.config.write_text(text.replace(old, new))
    vipd.proc.signal(signal.SIGHUP)
    wait_for(lambda: "admin token action=changed" in vipd.log(), what="the new token")
    assert Admin(vipd.admin_port, new).status()["pools"]  # type: ignore[arg-type]
    with pytest.raises(Exception, match="401"):
        Admin(vipd.admin_port, old).status()  # type: ignore[arg-type]
    # Without [admin] the listener stays open until a restart, and so does its token.
    vipd.config.write_text(text.split("[admin]")[0])
    vipd.proc.signal(signal.SIGHUP)
    wait_for(lambda: "admin listener kept" in vipd.log(), what="the kept listener")
    with pytest.raises(Exception, match="401"):
        Admin(vipd.admin_port).status()  # type: ignore[arg-type]
    assert Admin(vipd.admin_port, new).status()["pools"]  # type: ignore[arg-type]


def test_a_server_that_never_answers_does_not_slow_the_others(lab: Lab) -> None:
    good = lab.sink("good")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(512)              # accepted by the kernel, never read, never answered
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        blackhole = Sink(good.proc, good.store, silent.getsockname()[1], "silent")
        vipd = lab.vipd(config([good, blackhole], "interval_seconds = 0.5, timeout_seconds = 1, rise = 2, fall = 1",
                               extra_pool="greeting_timeout_seconds = 3"))
        admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
        latencies: list[float] = []
        codes: list[int] = []
        lock = threading.Lock()

        def client(index: int) -> None:
            for n in range(5):
                started = time.monotonic()
                code, _ = send(vipd, f"par-{index}-{n}")
                with lock:
                    latencies.append(time.monotonic() - started)
                    codes.append(code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert codes == [250] * 40
        # A transaction that met the silent server waits at most its greeting timeout, then is replayed;
        # everyone else is unaffected. Generous bound: the greeting timeout plus slack.
        assert max(latencies) < 3 + SLACK, sorted(latencies)[-5:]
        assert sorted(latencies)[len(latencies) // 2] < 3, sorted(latencies)
        assert admin.server("incoming", "silent")["state"] == "down"
        assert len(good.messages()) == 40
    finally:
        stop.set()
        holder.join(5)
        for conn in held:
            conn.close()
        silent.close()


def test_the_backup_takes_over_only_when_no_primary_is_left(lab: Lab) -> None:
    a, spare = lab.sink("a"), lab.sink("spare")
    text = config([a, spare]).replace('name = "spare" }', 'name = "spare", backup = true }')
    vipd = lab.vipd(text)
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    for i in range(3):
        assert send(vipd, f"primary-{i}")[0] == 250
    assert landed([a, spare], "primary-") == {"a": 3}
    a.proc.stop()
    wait_for(lambda: admin.server("incoming", "a")["state"] == "down", timeout=SLACK, what="a down")
    for i in range(3):
        assert send(vipd, f"backup-{i}")[0] == 250
    assert landed([a, spare], "backup-") == {"spare": 3}
    a = lab.restart_sink(a)
    wait_for(lambda: admin.server("incoming", "a")["state"] == "up", timeout=SLACK, what="a back")
    for i in range(3):
        assert send(vipd, f"again-{i}")[0] == 250
    assert landed([a, spare], "again-") == {"a": 3}
