"""The bench keeps working: ``python -m bench compare --smoke`` runs the baseline and vipd-1w under one
load, once, and writes a table and JSON with positive figures (the full run is a manual command);
``python -m bench idle --repeats 1`` measures vipd's memory per idle session (about 2 s).

The compare smoke needs Postfix's smtp-source and smtp-sink, which the bench unpacks from the Debian
package. It skips only when that cannot be done and we are neither root nor in CI (env CI set): there
it must run. The idle measurement needs nothing but vipd and 1,000 file descriptors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess

import pytest

from support import PYTHON, ROOT

SYSTEMS = ("baseline", "vipd-1w")


def _require_tools() -> None:
    """Unpack smtp-source and smtp-sink before the timed run (a first download may take a while)."""
    from bench.compare import DEFAULT_CACHE
    from bench.postfix import unpack
    from bench.system import Unavailable
    try:
        unpack(DEFAULT_CACHE)
    except Unavailable as exc:
        if os.geteuid() == 0 or os.environ.get("CI"):
            raise
        pytest.skip(f"not root and no smtp-source: {exc}")


def _first_number(cell: str) -> float:
    match = re.match(r"\s*([\d,]+(?:\.\d+)?)", cell)
    assert match, cell
    return float(match.group(1).replace(",", ""))


def test_compare_smoke_writes_table_and_json_with_vipd_and_baseline(tmp_path):
    _require_tools()
    out = subprocess.run([PYTHON, "-m", "bench", "compare", "--smoke", "--results", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr

    data = json.loads((tmp_path / "latest.json").read_text())
    rows = {row["system"]: row for row in data["results"]}
    assert set(SYSTEMS) <= set(rows), data["results"]
    for name in SYSTEMS:
        assert rows[name]["runs"] == 1 and not rows[name]["errors"], rows[name]
        assert rows[name]["msgs_per_s"]["median"] > 0, rows[name]
    vipd = rows["vipd-1w"]
    assert vipd["cpu_ms_per_msg"]["median"] > 0, vipd
    assert vipd["peak_rss_mib"]["median"] > 0, vipd
    assert 0 < vipd["ratio"], vipd
    assert data["micro"]["commands_per_s"]["median"] > 0

    table = (tmp_path / "latest.md").read_text()
    assert table in out.stdout + "\n"          # the table is printed at the end
    cells = {line.split("|")[2].strip(): line.split("|")[3:-1]
             for line in table.splitlines() if line.startswith("| ") and line.split("|")[2].strip() in SYSTEMS}
    assert set(cells) == set(SYSTEMS), table
    assert _first_number(cells["baseline"][0]) > 0
    assert _first_number(cells["vipd-1w"][0]) > 0          # msgs/s
    assert _first_number(cells["vipd-1w"][2]) > 0          # CPU ms/msg
    if importlib.util.find_spec("matplotlib") is not None:      # the bench extra; plots are skipped without it
        for png in ("msgs_per_s.png", "cpu_per_msg.png"):
            assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")


def test_idle_writes_memory_per_session(tmp_path):
    out = subprocess.run([PYTHON, "-m", "bench", "idle", "--repeats", "1", "--results", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr

    data = json.loads((tmp_path / "idle.json").read_text())
    assert data["sessions"] == 1000 and not data["errors"], data
    [sample] = data["samples"]
    assert sample["rss_after_bytes"] > sample["rss_before_bytes"] > 0, sample
    assert data["kib_per_session"]["median"] > 0 and data["goal_kib"] == 64, data   # goals are reported, not asserted
    assert "KiB per session" in out.stdout, out.stdout


def test_the_checks_system_runs_every_early_check_and_lets_the_bench_mail_through(lab, tmp_path):
    """vipd-1w-checks measures the checks only if they run, and measures nothing if they refuse the
    load generator's mail: the bench's own client, sender and recipient pass, others do not."""
    import smtplib
    from bench.loads import HELO, RECIPIENT, SENDER
    from bench.system import Endpoint
    from bench.systems import Vipd
    sink = lab.sink("sink")
    system = Vipd(1, checks=True)
    try:
        vip = system.start(tmp_path, [Endpoint("127.0.0.1", sink.port)])
        with smtplib.SMTP(vip.host, vip.port, local_hostname=HELO, timeout=30) as s:
            assert s.sendmail(SENDER, [RECIPIENT], b"Subject: bench\r\n\r\nhi\r\n") == {}
            s.mail(SENDER)
            code, text = s.rcpt("someone@elsewhere.example")          # relay control: not trusted
            assert (code, text[:5]) == (550, b"5.7.1"), text
            s.rset()
            code, text = s.mail("spam@spammer7.example")              # the access map
            assert code == 550, text
        with smtplib.SMTP(vip.host, vip.port, local_hostname="nosuch.client.bench.test", timeout=30) as s:
            code, text = s.ehlo()                                     # the HELO name must resolve
            assert code == 450 and text.startswith(b"4.7.1"), text
        with smtplib.SMTP(vip.host, vip.port, local_hostname=HELO, timeout=30,
                          source_address=("127.0.0.2", 0)) as s:       # the DNSBL lists RFC 5782's test point
            s.ehlo()
            code, text = s.mail(SENDER)
            assert code == 554 and b"bl.bench.test" in text, text
        dns_pid = system._dns.pid
    finally:
        system.stop()
    assert len(sink.messages()) == 1
    assert not os.path.exists(f"/proc/{dns_pid}")                    # its DNS server is stopped with it
