"""The command line: check-config reports every mistake; the lab shows a delivered message."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from support import PYTHON, ROOT, wait_for

THREE_MISTAKES = """
[vip.mx]
listen = ["127.0.0.1:0"]
default_pool = "missing"
max_recipents = 10

[pool.incoming]
servers = ["10.0.0.11"]
"""


def test_check_config_names_all_three_mistakes(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text(THREE_MISTAKES)
    out = subprocess.run([PYTHON, "-m", "vipd", "check-config", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert any("broken.toml" in ln and "vip.mx.default_pool" in ln and "missing" in ln for ln in lines), lines
    assert any("vip.mx.max_recipents" in ln and "unknown key" in ln for ln in lines), lines
    assert any("pool.incoming.servers[0]" in ln and "10.0.0.11" in ln for ln in lines), lines
    assert "3 errors" in out.stderr


def test_check_config_accepts_the_example():
    out = subprocess.run([PYTHON, "-m", "vipd", "check-config", str(ROOT / "conf" / "vipd.example.toml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": ok")


def test_run_with_a_broken_config_exits_nonzero_naming_the_problem(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text(THREE_MISTAKES)
    out = subprocess.run([PYTHON, "-m", "vipd", "run", "--config", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "vip.mx.default_pool" in out.stderr


def test_lab_once_delivers_the_sample_and_stops_everything(tmp_path):
    out = subprocess.run([PYTHON, "-m", "vipd", "lab", "--once", "--port", "0", "--dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"landed in (\S+\.eml)", out.stdout)
    assert match, out.stdout
    assert b"This message went through the VIP." in open(match.group(1), "rb").read()
    assert "swaks --server 127.0.0.1:" in out.stdout
    assert "stopped vipd and 2 sinks" in out.stdout
    # Nothing left running: the sinks' logs end and no process holds the store.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps


def test_vipctl_show_reads_the_admin_listener(lab):
    from support import pool_config
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    out = subprocess.run([PYTHON, "-m", "vipd.vipctl", "--admin", f"http://127.0.0.1:{vipd.admin_port}", "show"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pool incoming (roundrobin): 1/1 usable" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith(a.address))
    assert row.split()[1:4] == [a.address, "UP", "ready"]


def test_lab_scenario2_once_crosses_every_layer_and_stops_everything(tmp_path):
    out = subprocess.run([PYTHON, "-m", "vipd", "lab", "scenario2", "--once", "--dir", str(tmp_path / "lab")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    first = next(line for line in out.stdout.splitlines() if "VIP" in line)
    assert "Internet-facing VIP (mx): 127.0.0.1:" in first          # the entry point comes first
    assert "lab: sample through every layer: 250; at the gateway: " in out.stdout
    assert list((tmp_path / "lab" / "gateway").glob("*.eml"))
    assert "lab: a client on the DNSBL (127.0.0.2) got: 554 5.7.1" in out.stdout   # the lab's own DNS
    assert re.search(r"content VIP: 127\.0\.0\.1:\d+ +\(content, scanner builtin, spam spamd \(tag\);", out.stdout)
    assert re.search(r"^    mx pool: mx-1 127\.0\.0\.1:\d+ \(pid \d+\), mx-2 ", out.stdout, re.M), out.stdout
    assert "stopped vipd, 6 backends, 2 sinks, the DNS server and spamd;" in out.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps


def test_lab_scenario3_scans_with_a_private_clamd_in_the_second_pool(tmp_path):
    from backends.clamd_daemon import find_clamd
    if find_clamd() is None:
        pytest.skip("clamd is not installed: the lab falls back to the built-in scanner (see the next test)")
    out = subprocess.run([PYTHON, "-m", "vipd", "lab", "scenario3", "--once", "--dir", str(tmp_path / "lab")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"content2 VIP: 127\.0\.0\.1:\d+ +\(content, scanner clamd, spam spamd", out.stdout), out.stdout
    assert "lab: sample through every layer: 250; at the gateway: " in out.stdout
    assert "stopped vipd, 8 backends, 2 sinks, the DNS server, clamd and spamd;" in out.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps


def test_lab_without_clamd_scans_with_the_builtin_scanner(tmp_path, monkeypatch, capsys):
    """A machine without clamd: the clamd layer says so and scans with the built-in scanner."""
    import backends.clamd_daemon as clamd_daemon
    from vipd.lab_scenarios import start_clamd
    from vipd.topology import load_scenario
    monkeypatch.setattr(clamd_daemon, "find_clamd", lambda: None)
    topo, daemon = start_clamd(load_scenario("scenario3"), tmp_path)
    assert daemon is None
    assert "clamd is not installed" in capsys.readouterr().out
    assert [layer.scanner for layer in topo.layers if layer.scans] == ["builtin", "builtin"]


def test_lab_without_spamd_does_not_score(tmp_path, monkeypatch, capsys):
    """A machine without spamd: the lab says so and runs without spam scoring."""
    import backends.spamd_daemon as spamd_daemon
    from vipd.lab_scenarios import start_spamd
    from vipd.topology import load_scenario
    monkeypatch.setattr(spamd_daemon, "find_spamd", lambda: None)
    topo, daemon = start_spamd(load_scenario("scenario2"), tmp_path)
    assert daemon is None
    assert "spamd is not installed (Debian: spamd); mail is not scored for spam" in capsys.readouterr().out
    assert [layer.spam for layer in topo.layers] == [None, None, None]


def test_lab_scenario2_with_sendmail_backends_accepts_mail_and_stops_cleanly(tmp_path):
    import os
    from backends.sendmail import missing
    if missing():
        if os.environ.get("CI"):
            pytest.fail(f"sendmail cannot run here (missing: {missing()})")
        pytest.skip(f"sendmail cannot run here (missing: {missing()})")
    workdir = Path(tempfile.mkdtemp(prefix="vipd-lab-test-"))    # not under pytest's 0700 folders
    try:
        out = subprocess.run([PYTHON, "-m", "vipd", "lab", "scenario2", "--backends", "sendmail", "--once",
                              "--dir", str(workdir)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "lab: sample through every layer: 250; at the gateway: " in out.stdout
        assert re.search(r"^    delivery pool: delivery-1 127\.0\.0\.1:\d+ \(pid \d+, sendmail\)", out.stdout, re.M)
        assert "stopped vipd, 6 backends (4 sendmail), 2 sinks, the DNS server and spamd;" in out.stdout
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(workdir) not in ps and "sendmail" not in ps.replace("sendmail-", "")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("scenario", [[], ["scenario2"]], ids=["default", "scenario2"])
def test_a_running_lab_stops_everything_on_ctrl_c_term_and_hangup(tmp_path, scenario, sig):
    """Until the signal the lab serves; Ctrl-C, SIGTERM, and the terminal going away (SIGHUP: a lab has
    no configuration to reload) all stop every process it started."""
    workdir = tmp_path / "lab"
    port = ["--port", "0"] if not scenario else []
    with open(tmp_path / "out", "w+") as out:
        proc = subprocess.Popen([PYTHON, "-m", "vipd", "lab", *scenario, *port, "--dir", str(workdir)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        try:
            wait_for(lambda: "Ctrl-C stops the lab." in (tmp_path / "out").read_text(), timeout=60,
                     what="the lab to be up")
            proc.send_signal(sig)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = (tmp_path / "out").read_text()
    assert "lab: stopped vipd" in text, text
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(workdir) not in ps
