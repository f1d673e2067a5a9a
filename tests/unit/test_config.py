"""Tests for vipd.config: the example loads, defaults, parsed values, and every error at once."""

from __future__ import annotations

import dataclasses
import pickle
import socket
from pathlib import Path

import pytest

from vipd import config
from vipd.config import Config, ConfigError, Endpoint, parse_endpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "vipd.example.toml"

MINIMAL = """\
[vip.mx]
listen = ["127.0.0.1:2525"]
hostname = "mx.test"
default_pool = "incoming"

[pool.incoming]
servers = ["10.0.0.11:25"]
"""


def write(folder: Path, text: str, name: str = "vipd.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(folder: Path, text: str) -> list[str]:
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.errors == config.check(path)
    return caught.value.errors


# --- The example ---------------------------------------------------------------------------------


def test_example_config_loads() -> None:
    loaded = config.load(EXAMPLE)
    assert list(loaded.vips) == ["mx"]
    assert list(loaded.pools) == ["incoming", "bulk"]
    vip = loaded.vips["mx"]
    assert vip.banner == "mx1.example.com ESMTP AUTHORIZED USE ONLY"
    assert vip.routes is not None
    assert vip.routes.pools() <= set(loaded.pools)
    assert vip.routes_file == EXAMPLE.parent / "mailertable.example"
    assert loaded.spool_dir == EXAMPLE.parent / "spool"
    assert loaded.admin is not None and str(loaded.admin.listen) == "127.0.0.1:9025"


def test_example_config_checks_clean() -> None:
    assert config.check(EXAMPLE) == []


def test_example_routes_name_both_pools() -> None:
    vip = config.load(EXAMPLE).vips["mx"]
    assert vip.routes is not None
    assert vip.routes.lookup("Mail.Example.COM.") == "incoming"
    assert vip.routes.lookup("team.lists.example.net") == "bulk"


# --- Reporting every error at once -----------------------------------------------------------------


def test_three_mistakes_are_all_reported(tmp_path: Path) -> None:
    text = """\
[vip.mx]
listen = ["127.0.0.1:2525"]
hostname = "mx.test"
default_pool = "missing"
colour = "blue"

[pool.incoming]
servers = ["10.0.0.11"]
"""
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, text) == [
        f"{path}: vip.mx.colour: unknown key",
        f'{path}: vip.mx.default_pool: unknown pool "missing" (defined: "incoming")',
        f'{path}: pool.incoming.servers[0].address: expected host:port, got "10.0.0.11"',
    ]


def test_cross_checks_run_even_when_the_same_table_has_field_errors(tmp_path: Path) -> None:
    text = MINIMAL.replace('default_pool = "incoming"', 'default_pool = "nope"\nmax_sessions = 0')
    errors = errors_of(tmp_path, text)
    assert any(e.endswith("vip.mx.max_sessions: must be >= 1, got 0") for e in errors)
    assert any('vip.mx.default_pool: unknown pool "nope"' in e for e in errors)
    assert len(errors) == 2


def test_type_errors_name_key_and_value(tmp_path: Path) -> None:
    text = 'workers = "two"\nlog_level = "loud"\ngrace_seconds = -1\n' + MINIMAL.replace(
        'hostname = "mx.test"', 'hostname = "mx.test"\nreject_nul = "yes"\nprivacy = ["novrfy", "noverb"]'
    )
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, text) == [
        f'{path}: workers: expected an integer, got "two"',
        f'{path}: log_level: expected "debug", "info", "warning" or "error", got "loud"',
        f"{path}: grace_seconds: must be >= 0, got -1",
        f'{path}: vip.mx.reject_nul: expected true or false, got "yes"',
        f'{path}: vip.mx.privacy[1]: expected "needmailhelo", "noexpn", "novrfy" or "goaway", got "noverb"',
    ]


def test_missing_sections_and_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, "[vip.mx]\n") == [
        f"{path}: pool: missing (required)",
        f"{path}: vip.mx.listen: missing (required)",
        f"{path}: vip.mx.default_pool: missing (required)",
    ]


def test_bad_section_names_are_quoted_in_the_key_path(tmp_path: Path) -> None:
    text = MINIMAL.replace("[pool.incoming]", '[pool."in coming"]').replace('"incoming"', '"in coming"')
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, text) == [
        f'{path}: pool."in coming": invalid name "in coming": use letters, digits, "_", "." and "-"',
        f'{path}: vip.mx.default_pool: invalid name "in coming": use letters, digits, "_", "." and "-"',
    ]


def test_server_checks(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'servers = ["10.0.0.11:25"]',
        'servers = ["10.0.0.11:25", { address = "10.0.0.11:25", weight = 300 }, "10.0.0.11:25", 7]\n'
        "[pool.spare]\n"
        'servers = [{ address = "10.0.0.12:25", backup = true }]',
    )
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, text) == [
        f"{path}: pool.incoming.servers[1].weight: must be <= 256, got 300",
        f'{path}: pool.incoming.servers[3]: expected "host:port" or a table, got 7',
        f"{path}: pool.incoming.servers[2].address: duplicate address 10.0.0.11:25 (also servers[0])",
        f"{path}: pool.spare.servers: every server is a backup: at least one must not be",
    ]


def test_duplicate_server_names(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'servers = ["10.0.0.11:25"]',
        'servers = [{ address = "10.0.0.1:25", name = "a" }, { address = "10.0.0.2:25", name = "a" }]',
    )
    (error,) = errors_of(tmp_path, text)
    assert error.endswith('pool.incoming.servers[1].name: duplicate server name "a" (also servers[0])')


def test_duplicate_listeners_across_vips_and_admin(tmp_path: Path) -> None:
    text = MINIMAL + '[vip.other]\nlisten = ["127.0.0.1:2525", "[::1]:0"]\ndefault_pool = "incoming"\n'
    text += '[admin]\nlisten = "[::1]:0"\n'
    (error,) = errors_of(tmp_path, text)
    assert error.endswith(
        "vip.other.listen[0]: duplicate listen address 127.0.0.1:2525 (also vip.mx.listen[0])"
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("max_command_line_bytes = 511", "must be >= 512 (the minimum RFC 5321 allows), got 511"),
        (
            "max_text_line_bytes = 999",
            "must be 0 (no limit) or >= 1000 (the minimum RFC 5321 allows), got 999",
        ),
        ("max_message_bytes = 0", "must be >= 1, got 0"),
        ("data_timeout_seconds = 0.0", "must be > 0, got 0.0"),
        ("session_timeout_seconds = inf", "expected a finite number, got inf"),
        ("max_recipients = true", "expected an integer, got true"),
        ('banner = "two\\r\\nlines"', 'expected one line of printable ASCII, got "two\\r\\nlines"'),
        ('hostname = "not a name"', 'invalid hostname "not a name"'),
    ],
)
def test_vip_limits(tmp_path: Path, line: str, reason: str) -> None:
    key = line.split(" = ")[0]
    base = MINIMAL.replace('hostname = "mx.test"\n', "") if key == "hostname" else MINIMAL
    text = base.replace('default_pool = "incoming"', f'default_pool = "incoming"\n{line}')
    (error,) = errors_of(tmp_path, text)
    assert error == f"{tmp_path / 'vipd.toml'}: vip.mx.{key}: {reason}"


def test_text_line_limit_zero_means_unlimited(tmp_path: Path) -> None:
    text = MINIMAL.replace('default_pool = "incoming"', 'default_pool = "incoming"\nmax_text_line_bytes = 0')
    assert config.load(write(tmp_path, text)).vips["mx"].max_text_line_bytes == 0


def test_pool_choices_are_checked(tmp_path: Path) -> None:
    text = MINIMAL + 'balance = "random"\nidentity = "proxy-v3"\n'
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, text) == [
        f'{path}: pool.incoming.balance: expected "roundrobin", "leastconn" or "source", got "random"',
        f'{path}: pool.incoming.identity: expected "xclient", "xforward", "proxy-v1", "proxy-v2" or "none", '
        'got "proxy-v3"',
    ]


# --- Files, syntax, paths ----------------------------------------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 1\nlog_level = "info\n')
    (error,) = config.check(path)
    assert error.startswith(f"{path}:2:")
    assert "TOML syntax error" in error
    line, column = error.removeprefix(f"{path}:").split(":")[:2]
    assert line == "2" and column.isdigit()


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert config.check(path) == [f"{path}: cannot read: No such file or directory"]


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    write(folder, "example.com incoming\n", "mailertable")
    text = 'spool_dir = "spool"\n' + MINIMAL.replace(
        'hostname = "mx.test"', 'hostname = "mx.test"\nroutes = "mailertable"'
    )
    write(folder, text)
    monkeypatch.chdir(tmp_path)  # elsewhere, so a cwd-relative lookup would miss the file
    loaded = config.load(Path("etc/vipd.toml"))
    assert loaded.path == folder / "vipd.toml"
    assert loaded.spool_dir == folder / "spool"
    assert loaded.vips["mx"].routes_file == folder / "mailertable"
    assert loaded.vips["mx"].routes is not None
    assert loaded.vips["mx"].routes.lookup("example.com") == "incoming"


# --- Routes ------------------------------------------------------------------------------------------


def test_routes_errors_are_reported_one_by_one_with_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        "# routes\nexample.com incoming\nbad$key incoming\nlonely.example\nother.example nosuch\n",
        "mt",
    )
    text = MINIMAL.replace('hostname = "mx.test"', 'hostname = "mx.test"\nroutes = "mt"')
    path, routes = tmp_path / "vipd.toml", tmp_path / "mt"
    errors = errors_of(tmp_path, text)
    assert len(errors) == 3
    assert errors[0].startswith(f'{path}: vip.mx.routes: {routes}:3: bad key "bad$key"')
    assert errors[1] == f'{path}: vip.mx.routes: {routes}:4: missing value: "lonely.example" names no pool'
    assert errors[2] == f'{path}: vip.mx.routes: {routes}:5: unknown pool "nosuch" (defined: "incoming")'


def test_missing_routes_file(tmp_path: Path) -> None:
    text = MINIMAL.replace('hostname = "mx.test"', 'hostname = "mx.test"\nroutes = "absent"')
    (error,) = errors_of(tmp_path, text)
    config_file, routes_file = tmp_path / "vipd.toml", tmp_path / "absent"
    assert error == f"{config_file}: vip.mx.routes: {routes_file}: cannot read: No such file or directory"


# --- Defaults and parsed values ---------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, MINIMAL))
    assert (loaded.workers, loaded.spool_dir, loaded.nameservers) == (1, None, None)
    assert (loaded.log_level, loaded.grace_seconds, loaded.admin) == ("info", 30.0, None)
    vip = loaded.vips["mx"]
    assert vip.banner == "mx.test ESMTP"
    assert (vip.routes, vip.routes_file) == (None, None)
    assert (vip.max_message_bytes, vip.max_recipients, vip.max_sessions) == (10_485_760, 100, 1000)
    assert (vip.max_command_line_bytes, vip.max_text_line_bytes, vip.reject_nul) == (2048, 1000, True)
    assert vip.privacy == frozenset({"needmailhelo", "noexpn", "novrfy"})
    assert (vip.command_timeout_seconds, vip.data_timeout_seconds, vip.session_timeout_seconds) == (
        300.0,
        180.0,
        3600.0,
    )


def test_pool_defaults(tmp_path: Path) -> None:
    pool = config.load(write(tmp_path, MINIMAL)).pools["incoming"]
    assert (pool.name, pool.balance, pool.identity, pool.helo_name) == (
        "incoming",
        "roundrobin",
        "xclient",
        None,
    )
    assert (pool.connect_timeout_seconds, pool.greeting_timeout_seconds, pool.command_timeout_seconds) == (
        10.0,
        30.0,
        300.0,
    )
    assert (
        pool.data_init_timeout_seconds,
        pool.data_block_timeout_seconds,
        pool.data_done_timeout_seconds,
    ) == (
        120.0,
        180.0,
        600.0,
    )
    assert (pool.max_idle_per_server, pool.idle_timeout_seconds, pool.max_transactions_per_connection) == (
        64,
        30.0,
        1000,
    )
    (server,) = pool.servers
    assert server == config.ServerSpec("10.0.0.11:25", Endpoint("10.0.0.11", 25), 1, False, None)


def test_hostname_defaults_to_the_host_name_and_feeds_the_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "host.from.fqdn")
    text = MINIMAL.replace('hostname = "mx.test"\n', 'banner = "$hostname ready, $hostname says hi"\n')
    vip = config.load(write(tmp_path, text)).vips["mx"]
    assert vip.hostname == "host.from.fqdn"
    assert vip.banner == "host.from.fqdn ready, host.from.fqdn says hi"


def test_ipv6_listen_and_port_zero(tmp_path: Path) -> None:
    text = MINIMAL.replace('["127.0.0.1:2525"]', '["[::1]:25", "[2001:DB8:0::1]:0", "Localhost:587"]')
    listen = config.load(write(tmp_path, text)).vips["mx"].listen
    assert listen == (Endpoint("::1", 25), Endpoint("2001:db8::1", 0), Endpoint("localhost", 587))
    assert [str(endpoint) for endpoint in listen] == ["[::1]:25", "[2001:db8::1]:0", "localhost:587"]


def test_unbracketed_ipv6_is_refused(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, MINIMAL.replace('["127.0.0.1:2525"]', '["::1:25"]'))
    assert error.endswith('vip.mx.listen[0]: IPv6 addresses go in brackets, as "[::1]:25", got "::1:25"')


def test_server_tables_and_port_zero_refused_for_servers(tmp_path: Path) -> None:
    servers = 'servers = [{ address = "a.test:25", weight = 0, name = "a", max_sessions = 5 }, "b.test:25"]'
    pool = config.load(write(tmp_path, MINIMAL.replace('servers = ["10.0.0.11:25"]', servers))).pools[
        "incoming"
    ]
    assert pool.servers[0] == config.ServerSpec("a", Endpoint("a.test", 25), 0, False, 5)
    assert pool.servers[1].name == "b.test:25"
    (error,) = errors_of(tmp_path, MINIMAL.replace("10.0.0.11:25", "10.0.0.11:0"))
    assert error.endswith('pool.incoming.servers[0].address: port must be 1..65535, got "10.0.0.11:0"')


def test_goaway_expands_to_all_three(tmp_path: Path) -> None:
    text = MINIMAL.replace('hostname = "mx.test"', 'hostname = "mx.test"\nprivacy = ["goaway"]')
    assert config.load(write(tmp_path, text)).vips["mx"].privacy == frozenset(
        {"needmailhelo", "noexpn", "novrfy"}
    )
    text = MINIMAL.replace('hostname = "mx.test"', 'hostname = "mx.test"\nprivacy = ["novrfy"]')
    assert config.load(write(tmp_path, text)).vips["mx"].privacy == frozenset({"novrfy"})


def test_nameservers(tmp_path: Path) -> None:
    text = 'nameservers = ["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:5300"]\n' + MINIMAL
    assert config.load(write(tmp_path, text)).nameservers == (
        Endpoint("127.0.0.1", 53),
        Endpoint("127.0.0.1", 5353),
        Endpoint("::1", 53),
        Endpoint("::1", 5300),
    )
    (error,) = errors_of(tmp_path, 'nameservers = ["dns.test:53"]\n' + MINIMAL)
    assert error.endswith('nameservers[0]: expected an IP address with an optional port, got "dns.test:53"')


def test_sections_keep_file_order(tmp_path: Path) -> None:
    text = MINIMAL + '[pool.zeta]\nservers = ["10.0.0.1:25"]\n[pool.alpha]\nservers = ["10.0.0.2:25"]\n'
    assert list(config.load(write(tmp_path, text)).pools) == ["incoming", "zeta", "alpha"]


# --- Immutability -------------------------------------------------------------------------------------


def test_config_is_immutable_and_picklable(tmp_path: Path) -> None:
    loaded = config.load(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.workers = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        loaded.vips["other"] = loaded.vips["mx"]  # type: ignore[index]
    assert isinstance(loaded.vips["mx"].listen, tuple)
    assert isinstance(loaded.pools["incoming"].servers, tuple)
    # Worker processes may receive the Config by pickle.
    assert pickle.loads(pickle.dumps(loaded)) == loaded
    assert hash(pickle.loads(pickle.dumps(loaded))) == hash(loaded)


def test_from_toml_text_needs_no_file(tmp_path: Path) -> None:
    loaded = Config.from_toml_text(MINIMAL, tmp_path / "virtual.toml")
    assert loaded.path == tmp_path / "virtual.toml"
    assert loaded.vips["mx"].default_pool == "incoming"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:25", Endpoint("10.0.0.1", 25)),
        ("[::ffff:10.0.0.1]:25", Endpoint("::ffff:a00:1", 25)),
        ("MX.Example.COM:2525", Endpoint("mx.example.com", 2525)),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text", ["10.0.0.1", "10.0.0.1:", ":25", "[::1]", "10.0.0.1:65536", "10.0.0.999:25", "a b:25", "[x]:25"]
)
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


# --- Health and admin ----------------------------------------------------------------------------


def test_health_table_defaults_and_no_table(tmp_path: Path) -> None:
    none = config.load(write(tmp_path, MINIMAL)).pools["incoming"].health
    assert (none.smtp, none.agent_port, none.passive_failures) == (False, None, 3)
    text = MINIMAL + "health = { interval_seconds = 0.5, agent_port = 5555, slowstart_seconds = 10 }\n"
    h = config.load(write(tmp_path, text)).pools["incoming"].health
    assert (h.smtp, h.interval_seconds, h.timeout_seconds, h.agent_interval_seconds) == (True, 0.5, 0.5, 0.5)
    assert (h.rise, h.fall, h.agent_port, h.slowstart_seconds) == (2, 3, 5555, 10.0)
    text = MINIMAL.replace('"10.0.0.11:25"', '{ address = "10.0.0.11:25", agent_port = 7777 }')
    assert config.load(write(tmp_path, text)).pools["incoming"].servers[0].agent_port == 7777


def test_health_mistakes_are_named(tmp_path: Path) -> None:
    text = MINIMAL + 'health = { rise = 0, interval_seconds = -1, agent_port = 70000, bogus = 1 }\n'
    path = tmp_path / "vipd.toml"
    errors = errors_of(tmp_path, text)
    assert f"{path}: pool.incoming.health.rise: must be >= 1, got 0" in errors
    assert any(e.startswith(f"{path}: pool.incoming.health.interval_seconds: ") for e in errors)
    assert any(e.startswith(f"{path}: pool.incoming.health.agent_port: ") for e in errors)
    assert any(e.startswith(f"{path}: pool.incoming.health.bogus: ") for e in errors)


def test_admin_off_loopback_needs_a_token(tmp_path: Path) -> None:
    path = tmp_path / "vipd.toml"
    errors = errors_of(tmp_path, MINIMAL + '[admin]\nlisten = "0.0.0.0:9025"\n')
    assert errors == [f"{path}: admin.listen: 0.0.0.0:9025 is not loopback: set token or token_file, "
                      "so that only operators can change servers and pools"]
    ok = config.load(write(tmp_path, MINIMAL + '[admin]\nlisten = "0.0.0.0:9025"\ntoken = "0123456789abcdef"\n'))
    assert ok.admin is not None and ok.admin.token == "0123456789abcdef"
    assert config.load(write(tmp_path, MINIMAL + '[admin]\nlisten = "127.0.0.1:0"\n')).admin.token is None  # type: ignore[union-attr]


def test_admin_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token-0123456789\n")
    cfg = config.load(write(tmp_path, MINIMAL + '[admin]\nlisten = "[::]:9025"\ntoken_file = "token"\n'))
    assert cfg.admin is not None and cfg.admin.token == "s3cret-token-0123456789"
    path = tmp_path / "vipd.toml"
    (tmp_path / "short").write_text("abc")
    errors = errors_of(tmp_path, MINIMAL + '[admin]\nlisten = "127.0.0.1:9025"\ntoken_file = "short"\n')
    assert errors == [f"{path}: admin.token_file: the token must be 16 to 256 printable characters"]
    errors = errors_of(tmp_path, MINIMAL + '[admin]\nlisten = "127.0.0.1:9025"\ntoken_file = "missing"\n')
    assert errors == [f"{path}: admin.token_file: cannot read {tmp_path / 'missing'}: No such file or directory"]


def test_state_file_resolves_against_the_config_and_its_folder_must_exist(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, 'state_file = "state.json"\n' + MINIMAL))
    assert cfg.state_file == tmp_path / "state.json"
    assert config.load(write(tmp_path, MINIMAL)).state_file is None
    path = tmp_path / "vipd.toml"
    assert errors_of(tmp_path, 'state_file = "nowhere/state.json"\n' + MINIMAL) == [
        f"{path}: state_file: the folder {tmp_path / 'nowhere'} does not exist"]
    assert errors_of(tmp_path, f'state_file = "{tmp_path}"\n' + MINIMAL) == [
        f"{path}: state_file: {tmp_path} is a folder; name a file in it, e.g. {tmp_path / 'state.json'}"]
