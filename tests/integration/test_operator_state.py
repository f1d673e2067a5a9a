"""The operator's words survive a restart when ``state_file`` is set: a held pool stays held (the
shut-off valve must not open by itself), a drained server stays drained, a runtime weight stays;
with one worker and with several (there the supervisor keeps the file)."""

from __future__ import annotations

import json
import smtplib

import pytest

from support import Admin, Lab, health_config, wait_for


def _config(sinks, workers: int) -> str:
    return f'workers = {workers}\nstate_file = "state.json"\n' + health_config(sinks)


def _send(vipd, subject: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        s.mail("a@example.org")
        code, text = s.rcpt("b@example.com")
        if code != 250:
            return code, text.decode()
        code, text = s.data(f"Subject: {subject}\r\n\r\nhi\r\n".encode())
        return code, text.decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_hold_drain_and_weight_survive_a_restart(lab: Lab, workers: int) -> None:
    sinks = [lab.sink(n) for n in ("a", "b")]
    first = lab.vipd(_config(sinks, workers), name="first")
    admin = Admin(first.admin_port)  # type: ignore[arg-type]
    admin.vipctl("pool", "hold", "incoming")
    admin.vipctl("server", "drain", "incoming/a")
    admin.vipctl("server", "weight", "incoming/b", "3")
    saved = json.loads((lab.tmp / "state.json").read_text())
    assert saved == {"version": 1, "pools": {"incoming": {"held": True, "servers": {
        "a": {"admin": "drain"}, "b": {"weight": 3}}}}}
    assert first.proc.stop() == 0

    second = lab.vipd(_config(sinks, workers), name="second")      # the same state.json
    admin = Admin(second.admin_port)  # type: ignore[arg-type]
    assert admin.pool("incoming")["held"] is True
    assert admin.server("incoming", "a")["admin"] == "drain"
    assert admin.server("incoming", "b")["effective_weight"] == 3
    log = second.log()
    assert "state_file restored pool=incoming held=true" in log
    assert "state_file restored pool=incoming server=a admin=drain" in log
    code, text = _send(second, "while held")
    assert code == 451 and text.startswith("4.4.1"), (code, text)   # no spool here: the client keeps it

    admin.vipctl("pool", "release", "incoming")
    admin.vipctl("server", "ready", "incoming/a")
    admin.vipctl("server", "weight", "incoming/b", "config")
    assert json.loads((lab.tmp / "state.json").read_text()) == {"version": 1, "pools": {}}
    wait_for(lambda: admin.server("incoming", "a")["state"] == "up", what="a back up")
    assert _send(second, "released")[0] == 250


def test_a_broken_state_file_is_logged_and_vipd_still_starts(lab: Lab) -> None:
    sinks = [lab.sink("a")]
    (lab.tmp / "state.json").write_text("{not json")
    vipd = lab.vipd(_config(sinks, 1))
    assert "state_file ignored: " in vipd.log() and "state.json: not JSON" in vipd.log()
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    assert admin.pool("incoming")["held"] is False
    (lab.tmp / "state.json").write_text(json.dumps({"version": 1, "pools": {
        "gone": {"held": True, "servers": {}}, "incoming": {"held": False, "servers": {"zz": {"admin": "maint"}}}}}))
    again = lab.vipd(_config(sinks, 1), name="again")
    assert 'state_file skipped pool=gone reason="not in the configuration"' in again.log()
    assert 'state_file skipped pool=incoming server=zz reason="not in the configuration"' in again.log()
