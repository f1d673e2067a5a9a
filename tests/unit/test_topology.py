"""The topology files in conf/: they load, the vipd.toml kept beside each is the one they make (and vipd
loads it), the backends' command lines follow the layer order, and a broken file is refused with its
name, the key and the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vipd import config
from vipd.config import ConfigError
from vipd.topology import CONF_DIR, backend_command, load, load_scenario, render, scenario_names

SINKS = {"gateway": "127.0.0.1:2600", "outbound": "127.0.0.1:2601"}


def test_the_three_designs_are_in_conf() -> None:
    assert scenario_names() == ["scenario1", "scenario2", "scenario3"]
    roles = {name: [layer.role for layer in load_scenario(name).layers] for name in scenario_names()}
    assert roles == {"scenario1": ["incoming", "content+delivery"],
                     "scenario2": ["incoming", "content", "delivery"],
                     "scenario3": ["incoming", "content", "content", "delivery"]}
    # Scenario 3's two content pools are two vendors' engines.
    assert [layer.scanner for layer in load_scenario("scenario3").layers if layer.scans] == ["builtin", "clamd"]
    for name in scenario_names():
        topo = load_scenario(name)
        assert all(len(layer.servers) >= 2 for layer in topo.layers)
        assert topo.access.is_file() and topo.mailertable.is_file()


@pytest.mark.parametrize("name", ["scenario1", "scenario2", "scenario3"])
def test_each_kept_vipd_toml_is_current_and_loads(name: str) -> None:
    topo = load_scenario(name)
    kept = CONF_DIR / name / "vipd.toml"
    assert kept.read_text() == render(topo), f"run: vipd lab {name} --write-config"
    cfg = config.load(kept)
    assert list(cfg.vips) == topo.names and list(cfg.pools) == topo.names
    mx = cfg.vips["mx"]
    assert mx.access_file == topo.access and [z.zone for z in mx.dnsbl] == ["bl.vipd.test"]
    assert not mx.check_sender_domain
    assert [str(s.endpoint) for s in cfg.pools["mx"].servers] == list(topo.layer("mx").servers)


def test_command_lines_relay_to_the_next_layer_and_route_at_the_last() -> None:
    topo = load_scenario("scenario3")
    vips = {layer.name: layer.vip for layer in topo.layers}
    mx = backend_command(topo, "mx", 0, "127.0.0.1:0", vips, SINKS)
    assert "backends.relay" in mx and mx[mx.index("--next") + 1] == vips["content"]
    first = backend_command(topo, "content", 1, "127.0.0.1:0", vips, SINKS, clamd="unix:/c.sock")
    assert first[first.index("--next") + 1] == vips["content2"] and "--clamd" not in first
    assert first[first.index("--hostname") + 1] == "content-2.dmz.vipd.test"
    second = backend_command(topo, "content2", 0, "127.0.0.1:0", vips, SINKS, clamd="unix:/c.sock",
                             spamd="127.0.0.1:783")
    assert ["--no-builtin", "--clamd", "unix:/c.sock"] == second[second.index("--no-builtin"):][:3]
    assert ["--spamd", "127.0.0.1:783", "--spam-action", "tag"] == second[second.index("--spamd"):][:4]
    with pytest.raises(ValueError, match="needs a clamd address"):
        backend_command(topo, "content2", 0, "127.0.0.1:0", vips, SINKS, spamd="127.0.0.1:783")
    with pytest.raises(ValueError, match='layer content2: spam "spamd" needs a spamd address'):
        backend_command(topo, "content2", 0, "127.0.0.1:0", vips, SINKS, clamd="unix:/c.sock")
    unscored = backend_command(topo.without_spam(), "content2", 0, "127.0.0.1:0", vips, SINKS, clamd="unix:/c.sock")
    assert "--spamd" not in unscored
    last = backend_command(topo, "delivery", 0, "127.0.0.1:0", vips, SINKS)
    assert "backends.delivery" in last and "gateway=127.0.0.1:2600" in last
    combined = backend_command(load_scenario("scenario1"), "content", 0, "127.0.0.1:0", vips, SINKS, spamd="s:1")
    assert "backends.content" in combined and "--mailertable" in combined and "--next" not in combined


def _copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "mine"
    shutil.copytree(CONF_DIR / "scenario2", folder)
    path = folder / "topology.toml"
    path.write_text(edit(path.read_text()))
    return path


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace('role = "delivery"', 'role = "incoming"'),
     'layer[2].role: the last layer must be "delivery" or "content+delivery", got "incoming"'),
    (lambda t: t.replace('name = "delivery"', 'name = "content"'),
     "layer[2].name: 'content' is used by layer[1] already"),
    (lambda t: t.replace('servers = ["127.0.0.1:10055", "127.0.0.1:10056"]', 'servers = ["127.0.0.1:99999"]'),
     "layer[2].servers[0]: "),
    (lambda t: t.replace('internal_domain =', 'internal_domian ='), "internal_domian: unknown key"),
    (lambda t: t.replace('access = "access"', 'access = "nowhere"'), "access: no such file: "),
    (lambda t: t.replace('role = "incoming"', 'role = "incoming"\nscanner = "clamd"'),
     'layer[0].scanner: only content layers scan; this one is "incoming"'),
    (lambda t: t.replace('scanner = "builtin"', 'scanner = "sophos"'), "layer[1].scanner: "),
    (lambda t: t.replace('role = "delivery"', 'role = "delivery"\nspam = "spamd"'),
     'layer[2].spam: only content layers scan; this one is "delivery"'),
    (lambda t: t.replace('spam = "spamd"', 'spam = "rspamd"'), "layer[1].spam: "),
    (lambda t: t.replace('spam_action = "tag"', 'spam_action = "drop"'), "layer[1].spam_action: "),
    (lambda t: t.replace('spam = "spamd"', ''), "layer[1].spam_action: no spam scorer to act on"),
])
def test_a_broken_topology_names_the_file_the_key_and_the_reason(tmp_path: Path, edit, expected: str) -> None:
    path = _copy(tmp_path, edit)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert any(line.startswith(f"{path}: {expected}") for line in caught.value.errors), caught.value.errors
