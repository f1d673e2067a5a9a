"""Configuration: read vipd's TOML file (DESIGN.md section 4) into validated, immutable settings.

Rule: no raw TOML dict leaves this module. `load` returns a frozen `Config` of parsed values
(`Endpoint`, `Path`, `RouteTable`, tuples, read-only mappings) or raises `ConfigError` listing
every mistake at once, each as "{file}: {key.path}: {reason}", so that `vipd check-config`
needs one run, not one per typo.

Validation runs in two passes:

1. pydantic checks fields: types, ranges, formats and unknown keys. Each `[vip.NAME]` and
   `[pool.NAME]` table is validated on its own, so one broken table hides nothing elsewhere.
2. Cross-checks over whatever passed (a value is re-validated on its own when its table
   failed): `default_pool` and the pools named by `routes` exist, server names and addresses
   are unique in a pool, a pool has a non-backup server, no two listeners share an address.

Relative paths resolve against the config file's folder and come out absolute.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from vipd.errors import VipdError
from vipd.policy.access import AccessError, AccessMap, load_access
from vipd.policy.dnsbl import check_template
from vipd.routing import RouteTable, RoutesError, load_routes

__all__ = [
    "AdminConfig",
    "Balance",
    "Config",
    "ConfigError",
    "Endpoint",
    "FrozenMap",
    "HealthConfig",
    "Identity",
    "LogLevel",
    "PoolConfig",
    "QueueConfig",
    "ServerSpec",
    "VipConfig",
    "check",
    "load",
    "load_table",
    "loads",
    "parse_endpoint",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

Balance = Literal["roundrobin", "leastconn", "source"]
Identity = Literal["xclient", "xforward", "proxy-v1", "proxy-v2", "none"]
LogLevel = Literal["debug", "info", "warning", "error"]
Privacy = Literal["needmailhelo", "noexpn", "novrfy", "goaway"]

_GOAWAY = frozenset({"needmailhelo", "noexpn", "novrfy"})
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]+")
_TOML_POSITION_RE = re.compile(r"(?P<reason>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)")
_MIN_COMMAND_LINE = 512  # RFC 5321 section 4.5.3.1.4
_MIN_TEXT_LINE = 1000  # RFC 5321 section 4.5.3.1.6
_DNS_PORT = 53


# --- Output values -----------------------------------------------------------------------------


class ConfigError(VipdError):
    """The configuration is unusable; `errors` holds every reason, one "file: key: reason" each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class FrozenMap(Mapping[K, V]):
    """Read-only mapping in insertion order.

    Unlike types.MappingProxyType it pickles, so a Config can be handed to worker processes.
    """

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __hash__(self) -> int:
        # Mapping drops __hash__ because dicts are mutable; this one is not, so Config stays hashable.
        return hash(tuple(self._data.items()))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and port; `host` is an IP in canonical form (IPv6 without brackets) or a lowercase name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One backend of a pool; `name` defaults to str(endpoint); `agent_port` overrides the pool's."""

    name: str
    endpoint: Endpoint
    weight: int
    backup: bool
    max_sessions: int | None
    agent_port: int | None = None


@dataclass(frozen=True, slots=True)
class DnsblZone:
    """One DNS blocklist: its weight in the score and the answers that count (None: any)."""

    zone: str
    weight: int
    accept: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class VipConfig:
    """A `[vip.NAME]` listener. `banner` is expanded; `privacy` has "goaway" replaced by its three flags."""

    name: str
    listen: tuple[Endpoint, ...]
    hostname: str
    banner: str
    default_pool: str
    routes: RouteTable | None
    routes_file: Path | None
    max_message_bytes: int
    max_recipients: int
    max_command_line_bytes: int
    max_text_line_bytes: int  # 0: no limit
    max_sessions: int
    reject_nul: bool
    privacy: frozenset[str]
    command_timeout_seconds: float
    data_timeout_seconds: float
    session_timeout_seconds: float
    access: AccessMap | None
    access_file: Path | None
    relay_domains: frozenset[str]
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    dnsbl: tuple[DnsblZone, ...]
    dnsbl_threshold: int
    dnsbl_reply: str | None
    delay_checks: bool
    helo_strict: bool
    reject_unknown_helo: bool
    check_sender_domain: bool   # only with `nameservers`: vipd never guesses a resolver
    greet_delay_seconds: float
    max_sessions_per_client: int  # 0: no limit
    max_connections_per_client_per_minute: int  # 0: no limit
    max_refused_recipients: int
    refuse_load: float | None
    queue_load: float | None = None   # QueueLA: above it, accept and spool instead of relaying
    tls_cert: Path | None = None      # STARTTLS is offered when set (with tls_key)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # ask clients for a certificate, verified against these CAs
    require_tls_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    require_tls_for: frozenset[str] = frozenset()   # recipient domains that need TLS
    accept_proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()   # PROXY v1/v2 required
    chunking: bool = False            # offer CHUNKING (BDAT, RFC 3030)
    max_errors_per_session: int = 20          # Postfix smtpd_hard_error_limit
    max_messages_per_session: int = 1000
    min_data_rate_bytes_per_second: int = 100  # after min_data_rate_grace_seconds of DATA; 0: no minimum
    min_data_rate_grace_seconds: float = 30.0  # a slow start (TCP slow start, a busy client) is no slowloris


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """A pool's `health` table. `smtp` False: no active SMTP check (absent table: no checks at all).

    Passive checks and slow start work with or without active checks.
    """

    smtp: bool = False
    interval_seconds: float = 2.0
    timeout_seconds: float = 2.0
    rise: int = 2
    fall: int = 3
    require: str | None = None       # an EHLO keyword the server must list
    agent_port: int | None = None
    agent_interval_seconds: float = 2.0
    slowstart_seconds: float = 0.0
    passive_failures: int = 3        # 0: no outlier ejection



@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A `[pool.NAME]` of backends. `helo_name` None means: the hostname of the VIP being served."""

    name: str
    balance: Balance
    servers: tuple[ServerSpec, ...]
    identity: Identity
    helo_name: str | None
    connect_timeout_seconds: float
    greeting_timeout_seconds: float
    command_timeout_seconds: float
    data_init_timeout_seconds: float
    data_block_timeout_seconds: float
    data_done_timeout_seconds: float
    max_idle_per_server: int
    idle_timeout_seconds: float
    max_transactions_per_connection: int
    health: HealthConfig = HealthConfig()
    tls: Literal["none", "opportunistic", "required"] = "none"   # STARTTLS to the backends
    tls_verify: bool = False            # check the backend's certificate chain and name
    tls_ca: Path | None = None          # CAs for tls_verify (default: the system's)
    tls_server_name: str | None = None  # the name to send (SNI) and check (default: the server's host)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """The `[queue]` table: how the durable failover queue (under `spool_dir`) retries and gives up."""

    retry_min_seconds: float = 5.0
    retry_max_seconds: float = 600.0       # like sendmail -q10m
    concurrency: int = 10                  # deliveries at once per pool
    warn_seconds: float = 4 * 3600.0       # a delay notice (0: never)
    return_seconds: float = 5 * 86400.0    # a bounce
    bounce_pool: str | None = None         # where notifications go; default: routed like any mail


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The `[admin]` HTTP listener. `token`: the bearer token every API call must carry (required
    when the listener is not on loopback)."""

    listen: Endpoint
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, valid configuration. `vips` and `pools` keep file order; `path` is absolute."""

    path: Path
    workers: int
    spool_dir: Path | None
    nameservers: tuple[Endpoint, ...] | None  # None: the system's resolvers
    log_level: LogLevel
    grace_seconds: float
    vips: Mapping[str, VipConfig]
    pools: Mapping[str, PoolConfig]
    admin: AdminConfig | None
    queue: QueueConfig = QueueConfig()
    state_file: Path | None = None          # where operator changes are kept across restarts

    @classmethod
    def from_toml_text(cls, text: str, path: str | os.PathLike[str] = "vipd.toml") -> Config:
        """Same as `loads`: parse `text` as if read from `path` (which need not exist)."""
        return loads(text, path)


# --- Public entry points -----------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at `path`; raises ConfigError with every problem found."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte offset {exc.start})"]) from exc
    return loads(text, path)


def loads(text: str, path: str | os.PathLike[str] = "vipd.toml") -> Config:
    """Validate TOML `text`; `path` names it in errors and anchors relative paths."""
    path = Path(path)
    data = _parse_toml(text, path)
    config, problems = _Analysis(data, path).run()
    if config is None:
        raise ConfigError([_format(path, loc, reason) for loc, reason in problems])
    return config


def check(path: str | os.PathLike[str]) -> list[str]:
    """Every error in the config file at `path`; an empty list when it is valid."""
    try:
        load(path)
    except ConfigError as exc:
        return exc.errors
    return []


def load_table(path: str | os.PathLike[str], model: type[M]) -> M:
    """Read another of vipd's TOML files (a lab topology) into a pydantic `model` of this module's
    kind; raises ConfigError with every problem, each "file: key: reason" as for the config."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte offset {exc.start})"]) from exc
    try:
        return model.model_validate(_parse_toml(text, path))
    except ValidationError as exc:
        raise ConfigError([_format(path, tuple(err["loc"]), _reason(err))
                           for err in _without_echoes(exc.errors())]) from exc


def parse_endpoint(text: str, *, allow_any_port: bool = False) -> Endpoint:
    """Parse "host:port" or "[v6]:port"; port 0 ("any free port") only if `allow_any_port`.

    Raises ValueError with a reason fit for an operator.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"expected host:port, got {_quote(text)}")
    port, lowest = int(port_text), 0 if allow_any_port else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be {lowest}..65535, got {_quote(text)}")
    return Endpoint(_parse_host(host, text), port)


def _parse_host(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {_quote(text)}") from None
    if ":" in host:
        raise ValueError(f'IPv6 addresses go in brackets, as "[::1]:25", got {_quote(text)}')
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if not _is_hostname(host):
        raise ValueError(f"invalid host in {_quote(text)}")
    return host.lower()


def _parse_nameserver(text: str) -> Endpoint:
    """An IP, "[v6]", "ip:port" or "[v6]:port"; names are refused since resolving them needs DNS."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return Endpoint(str(ipaddress.ip_address(bare)), _DNS_PORT)
    except ValueError:
        pass
    endpoint = parse_endpoint(text)
    try:
        ipaddress.ip_address(endpoint.host)
    except ValueError:
        raise ValueError(f"expected an IP address with an optional port, got {_quote(text)}") from None
    return endpoint


def _is_hostname(name: str) -> bool:
    # An all-numeric last label is a mistyped IPv4 address, not a name.
    return (
        len(name) <= 253
        and _HOSTNAME_RE.fullmatch(name) is not None
        and not name.rsplit(".", 1)[-1].isdigit()
    )


# --- Field types for pass 1 ----------------------------------------------------------------------


def _fail(reason: str) -> NoReturn:
    # The reason goes in ctx, not in the template, so braces in user input are not formatted.
    raise PydanticCustomError("vipd", "{reason}", {"reason": reason})


def _string_field(parse: Callable[[str], T], expected: str = "a string") -> PlainValidator:
    """A validator taking a TOML string through `parse`, whose ValueError becomes the reason."""

    def validate(value: object) -> T:
        if not isinstance(value, str):
            _fail(f"expected {expected}, got {_show(value)}")
        try:
            return parse(value)
        except ValueError as exc:
            _fail(str(exc))

    return PlainValidator(validate)


def _check_name(text: str) -> str:
    if not _NAME_RE.fullmatch(text):
        raise ValueError(f'invalid name {_quote(text)}: use letters, digits, "_", "." and "-"')
    return text


def _check_hostname(text: str) -> str:
    if not _is_hostname(text):
        raise ValueError(f"invalid hostname {_quote(text)}")
    return text


def _check_token(text: str) -> str:
    # Server names end up in logs and metric labels, where spaces would split fields.
    if not _PRINTABLE_RE.fullmatch(text) or " " in text:
        raise ValueError(f"expected printable ASCII without spaces, got {_quote(text)}")
    return text


def _check_line(text: str) -> str:
    # The banner goes on the 220 line: a CR or LF in it would forge extra reply lines.
    if not _PRINTABLE_RE.fullmatch(text):
        raise ValueError(f"expected one line of printable ASCII, got {_quote(text)}")
    return text


def _check_path(text: str) -> str:
    if not text or "\0" in text:
        raise ValueError(f"expected a path, got {_quote(text)}")
    return text


def _check_command_line_limit(value: int) -> int:
    if value < _MIN_COMMAND_LINE:
        _fail(f"must be >= {_MIN_COMMAND_LINE} (the minimum RFC 5321 allows), got {value}")
    return value


def _check_text_line_limit(value: int) -> int:
    if value != 0 and value < _MIN_TEXT_LINE:
        _fail(f"must be 0 (no limit) or >= {_MIN_TEXT_LINE} (the minimum RFC 5321 allows), got {value}")
    return value


def _check_network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"expected an address or network like 10.0.0.0/8, got {_quote(text)}") from None
    return text


def _check_domain(text: str) -> str:
    # A relay domain: a host name, optionally with a leading dot meaning "and its subdomains".
    if not _is_hostname(text.removeprefix(".")):
        raise ValueError(f"invalid domain {_quote(text)}")
    return text.lower().rstrip(".")


def _check_answer_range(text: str) -> str:
    low, _, high = text.partition("-")
    try:
        ipaddress.IPv4Address(low)
        ipaddress.IPv4Address(high or low)
    except ValueError:
        raise ValueError(f"expected an address or a range like 127.0.0.2-127.0.0.11, got {_quote(text)}") from None
    return text


def _check_dnsbl_template(text: str) -> str:
    _check_line(text)
    check_template(text)        # names the unknown $field
    return text


def _server_shorthand(value: object) -> object:
    """Expand the shorthand "host:port" into { address = "host:port" }."""
    if isinstance(value, str):
        return {"address": value}
    if not isinstance(value, dict):
        _fail(f'expected "host:port" or a table, got {_show(value)}')
    return value


_HOST_PORT = 'a string "host:port"'
Name = Annotated[str, _string_field(_check_name)]
Hostname = Annotated[str, _string_field(_check_hostname)]
Token = Annotated[str, _string_field(_check_token)]
Line = Annotated[str, _string_field(_check_line)]
PathText = Annotated[str, _string_field(_check_path, "a string (a path)")]
ListenAddress = Annotated[Endpoint, _string_field(partial(parse_endpoint, allow_any_port=True), _HOST_PORT)]
ServerAddress = Annotated[Endpoint, _string_field(parse_endpoint, _HOST_PORT)]
Nameserver = Annotated[Endpoint, _string_field(_parse_nameserver, 'a string "ip" or "ip:port"')]
Seconds = Annotated[float, Field(gt=0)]
Positive = Annotated[int, Field(ge=1)]
Network = Annotated[str, _string_field(_check_network, 'a string "address/prefix"')]
Domain = Annotated[str, _string_field(_check_domain)]
AnswerRange = Annotated[str, _string_field(_check_answer_range)]
DnsblTemplate = Annotated[str, _string_field(_check_dnsbl_template)]
# Range checks with an RFC-citing reason rather than pydantic's bare "must be >= N".
CommandLineLimit = Annotated[int, AfterValidator(_check_command_line_limit)]
TextLineLimit = Annotated[int, AfterValidator(_check_text_line_limit)]
# TOML arrays arrive as lists; strict mode would refuse them for tuple fields, items stay strict.
Array = partial(Field, strict=False)


class _Schema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class _ServerTable(_Schema):
    address: ServerAddress
    weight: Annotated[int, Field(ge=0, le=256)] = 1
    backup: bool = False
    max_sessions: Positive | None = None
    name: Token | None = None
    agent_port: Annotated[int, Field(ge=1, le=65535)] | None = None


_ServerEntry = Annotated[_ServerTable, BeforeValidator(_server_shorthand)]


class _HealthTable(_Schema):
    smtp: bool = True
    interval_seconds: Seconds = 2.0
    timeout_seconds: Seconds | None = None      # default: the interval
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    require: Token | None = None
    agent_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    agent_interval_seconds: Seconds | None = None   # default: the interval
    slowstart_seconds: Annotated[float, Field(ge=0, le=3600)] = 0.0
    passive_failures: Annotated[int, Field(ge=0, le=1000)] = 3


class _PoolTable(_Schema):
    balance: Balance = "roundrobin"
    servers: Annotated[tuple[_ServerEntry, ...], Array(min_length=1)]
    identity: Identity = "xclient"
    helo_name: Hostname | None = None
    connect_timeout_seconds: Seconds = 10.0
    # Not RFC 5321's 5 minutes: a backend next door that has not greeted in 30 s is not going to,
    # and a transaction waiting on it is one a healthy server could have carried (it is replayed).
    greeting_timeout_seconds: Seconds = 30.0
    command_timeout_seconds: Seconds = 300.0
    data_init_timeout_seconds: Seconds = 120.0
    data_block_timeout_seconds: Seconds = 180.0
    data_done_timeout_seconds: Seconds = 600.0
    max_idle_per_server: Annotated[int, Field(ge=0)] = 64
    idle_timeout_seconds: Seconds = 30.0
    max_transactions_per_connection: Positive = 1000
    health: _HealthTable | None = None
    tls: Literal["none", "opportunistic", "required"] = "none"
    tls_verify: bool = False
    tls_ca: PathText | None = None
    tls_server_name: Hostname | None = None


class _DnsblTable(_Schema):
    zone: Hostname
    weight: Annotated[int, Field(ge=1)] = 1
    accept: Annotated[tuple[AnswerRange, ...], Array(min_length=1)] | None = None


class _VipTable(_Schema):
    listen: Annotated[tuple[ListenAddress, ...], Array(min_length=1)]
    # gethostname, not getfqdn: getfqdn asks DNS, and loading a config must never send a query.
    # A lambda: looked up on each load, and patchable in tests.
    hostname: Hostname = Field(default_factory=lambda: socket.gethostname())
    banner: Line = "$hostname ESMTP"
    default_pool: Name
    routes: PathText | None = None
    max_message_bytes: Positive = 10_485_760
    max_recipients: Positive = 100
    max_command_line_bytes: CommandLineLimit = 2048
    max_text_line_bytes: TextLineLimit = 1000  # 0: no limit
    max_sessions: Positive = 1000     # an idle session costs about 2 KiB (bench idle): slots are cheap
    reject_nul: bool = True
    privacy: Annotated[tuple[Privacy, ...], Array()] = ("needmailhelo", "noexpn", "novrfy")
    command_timeout_seconds: Seconds = 300.0
    data_timeout_seconds: Seconds = 180.0
    session_timeout_seconds: Seconds = 3600.0
    # Early checks (docs/policy.md).
    access: PathText | None = None
    relay_domains: Annotated[tuple[Domain, ...], Array()] = ()
    trusted_networks: Annotated[tuple[Network, ...], Array()] = ()
    dnsbl: Annotated[tuple[_DnsblTable, ...], Array()] = ()
    dnsbl_threshold: Annotated[int, Field(ge=1)] = 1
    dnsbl_reply: DnsblTemplate | None = None
    delay_checks: bool = False
    helo_strict: bool = False   # True: Postfix's reject_non_fqdn_helo_hostname too
    reject_unknown_helo: bool = False
    check_sender_domain: bool = True
    greet_delay_seconds: Annotated[float, Field(ge=0)] = 0.0
    max_sessions_per_client: Annotated[int, Field(ge=0)] = 50
    max_connections_per_client_per_minute: Annotated[int, Field(ge=0)] = 0
    max_refused_recipients: Annotated[int, Field(ge=1)] = 20
    refuse_load: Annotated[float, Field(gt=0)] | None = None
    queue_load: Annotated[float, Field(gt=0)] | None = None
    tls_cert: PathText | None = None
    tls_key: PathText | None = None
    tls_client_ca: PathText | None = None
    require_tls_from: Annotated[tuple[Network, ...], Array()] = ()
    require_tls_for: Annotated[tuple[Domain, ...], Array()] = ()
    accept_proxy_from: Annotated[tuple[Network, ...], Array()] = ()
    chunking: bool = False
    max_errors_per_session: Annotated[int, Field(ge=1, le=1000)] = 20
    max_messages_per_session: Annotated[int, Field(ge=1)] = 1000
    min_data_rate_bytes_per_second: Annotated[int, Field(ge=0)] = 100
    min_data_rate_grace_seconds: Annotated[float, Field(ge=1)] = 30.0


class _QueueTable(_Schema):
    retry_min_seconds: Seconds = 5.0
    retry_max_seconds: Seconds = 600.0
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 10
    warn_seconds: Annotated[float, Field(ge=0)] = 4 * 3600.0
    return_seconds: Seconds = 5 * 86400.0
    bounce_pool: Name | None = None


class _AdminTable(_Schema):
    listen: ListenAddress
    token: Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")] | None = None
    token_file: PathText | None = None


class _Document(_Schema):
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    spool_dir: PathText | None = None
    state_file: PathText | None = None
    nameservers: Annotated[tuple[Nameserver, ...], Array(min_length=1)] | None = None
    log_level: LogLevel = "info"
    grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    # Only the table shapes here: each table is validated on its own in _Analysis.
    vip: Annotated[dict[Name, dict[str, Any]], Field(min_length=1)]
    pool: Annotated[dict[Name, dict[str, Any]], Field(min_length=1)]
    admin: _AdminTable | None = None
    queue: _QueueTable | None = None


# --- The two passes ----------------------------------------------------------------------------

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
M = TypeVar("M", bound=BaseModel)

# Pass 2 re-validates single values with these, to cross-check what passed even in a broken table.
_NAME: TypeAdapter[str] = TypeAdapter(Name)
_PATH: TypeAdapter[str] = TypeAdapter(PathText)
_LISTEN: TypeAdapter[Endpoint] = TypeAdapter(ListenAddress)
_SERVER: TypeAdapter[_ServerTable] = TypeAdapter(_ServerEntry)


class _Analysis:
    """One validation of parsed TOML `data` read from `path`: both passes, then assembly."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path
        self.problems: list[Problem] = []
        self.vip_tables = _tables(data, "vip")
        self.pool_tables = _tables(data, "pool")
        # None when [pool] itself is missing or malformed: pass 1 says so, and an
        # "unknown pool" for every reference would only bury that one error.
        self.pool_names = frozenset(self.pool_tables) if isinstance(data.get("pool"), dict) else None

    def run(self) -> tuple[Config | None, list[Problem]]:
        """The Config, or None and every problem found."""
        document = self._validate(_Document, self.data, ())
        vips: dict[str, tuple[_VipTable, RouteTable | None]] = {}
        for name, raw in self.vip_tables.items():
            vip = self._validate(_VipTable, raw, ("vip", name))
            routes = self._check_vip_references(name, raw)
            access = self._load_access(("vip", name, "access"), raw.get("access"))
            if vip is not None:
                vips[name] = (vip, routes, access)
        pools: dict[str, _PoolTable] = {}
        for name, raw in self.pool_tables.items():
            pool = self._validate(_PoolTable, raw, ("pool", name))
            self._check_servers(("pool", name), raw.get("servers"))
            if pool is not None:
                pools[name] = pool
        self._check_listeners()
        self._check_admin()
        self._check_queue()
        if document is not None and document.state_file is not None:
            self._check_state_file(self._relative(document.state_file).absolute())
        for name, raw in self.vip_tables.items():
            self._check_tls(("vip", name), raw)
        if self.problems or document is None:
            return None, self.problems
        return self._assemble(document, vips, pools), []

    def _add(self, loc: Loc, reason: str) -> None:
        self.problems.append((loc, reason))

    def _validate(self, model: type[M], data: object, loc: Loc) -> M | None:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            errors = _without_echoes(exc.errors())
            self.problems.extend(((*loc, *err["loc"]), _reason(err)) for err in errors)
            return None

    def _check_vip_references(self, name: str, raw: dict[str, Any]) -> RouteTable | None:
        """Check that default_pool exists and load the routes file; the RouteTable if it loaded."""
        loc: Loc = ("vip", name)
        pool = _salvage(_NAME, raw.get("default_pool"))
        if pool is not None and self._is_unknown_pool(pool):
            self._add((*loc, "default_pool"), f"unknown pool {_quote(pool)}{self._pool_hint()}")
        routes = _salvage(_PATH, raw.get("routes"))
        return None if routes is None else self._load_routes((*loc, "routes"), self._relative(routes))

    def _load_routes(self, loc: Loc, file: Path) -> RouteTable | None:
        try:
            table: RouteTable | None = load_routes(file)
        except RoutesError as exc:
            for error in exc.errors:
                self._add(loc, error)
            table = exc.table
        for _key, pool, lineno in table.entries if table is not None else ():
            if self._is_unknown_pool(pool):
                self._add(loc, f"{file}:{lineno}: unknown pool {_quote(pool)}{self._pool_hint()}")
        return table

    def _load_access(self, loc: Loc, value: object) -> AccessMap | None:
        path = _salvage(_PATH, value)
        if path is None:
            return None
        file = self._relative(path)
        try:
            return load_access(file)
        except AccessError as exc:
            for error in exc.errors:
                self._add(loc, error)
            return None

    def _is_unknown_pool(self, name: str) -> bool:
        return self.pool_names is not None and name not in self.pool_names

    def _pool_hint(self) -> str:
        names = ", ".join(_quote(name) for name in sorted(self.pool_names or ()))
        return f" (defined: {names})" if names else " (no pool is defined)"

    def _check_servers(self, loc: Loc, items: object) -> None:
        """Server names and addresses are unique in a pool, and not every server is a backup."""
        if not isinstance(items, list):
            return
        servers = [_salvage(_SERVER, item) for item in items]
        names: dict[str, int] = {}
        addresses: dict[Endpoint, int] = {}
        for index, server in enumerate(servers):
            if server is not None:
                self._check_server((*loc, "servers", index), index, server, names, addresses)
        if servers and all(server is not None and server.backup for server in servers):
            self._add((*loc, "servers"), "every server is a backup: at least one must not be")

    def _check_server(
        self,
        loc: Loc,
        index: int,
        server: _ServerTable,
        names: dict[str, int],
        addresses: dict[Endpoint, int],
    ) -> None:
        name = server.name or str(server.address)
        first_address = addresses.setdefault(server.address, index)
        first_name = names.setdefault(name, index)
        if first_address != index:
            self._add(
                (*loc, "address"), f"duplicate address {server.address} (also servers[{first_address}])"
            )
        # A defaulted name repeats only because the address does: one error is enough.
        if first_name != index and (server.name is not None or first_address == index):
            where = (*loc, "name") if server.name is not None else loc
            self._add(where, f"duplicate server name {_quote(name)} (also servers[{first_name}])")

    def _check_listeners(self) -> None:
        """No two listeners (VIPs and admin) may bind the same address."""
        seen: dict[Endpoint, Loc] = {}
        for loc, value in self._listen_values():
            endpoint = _salvage(_LISTEN, value)
            # Port 0 asks the kernel for a free port, which differs on every bind.
            if endpoint is None or endpoint.port == 0:
                continue
            first = seen.setdefault(endpoint, loc)
            if first != loc:
                self._add(loc, f"duplicate listen address {endpoint} (also {_key_path(first)})")

    def _listen_values(self) -> Iterator[tuple[Loc, object]]:
        for name, raw in self.vip_tables.items():
            values = raw.get("listen")
            if isinstance(values, list):
                yield from ((("vip", name, "listen", index), value) for index, value in enumerate(values))
        admin = self.data.get("admin")
        if isinstance(admin, dict) and "listen" in admin:
            yield ("admin", "listen"), admin["listen"]

    def _relative(self, text: str) -> Path:
        """`text` against the config's folder, as the operator would name it (not yet absolute)."""
        return self.path.parent / text

    def _assemble(
        self,
        document: _Document,
        vips: dict[str, tuple[_VipTable, RouteTable | None]],
        pools: dict[str, _PoolTable],
    ) -> Config:
        spool = document.spool_dir
        return Config(
            path=self.path.absolute(),
            workers=document.workers,
            spool_dir=None if spool is None else self._relative(spool).absolute(),
            nameservers=document.nameservers,
            log_level=document.log_level,
            grace_seconds=document.grace_seconds,
            vips=FrozenMap((name, self._vip(name, *vip)) for name, vip in vips.items()),
            pools=FrozenMap((name, _pool(name, pool, self._relative)) for name, pool in pools.items()),
            admin=None if document.admin is None else AdminConfig(document.admin.listen,
                                                                   self._admin_token(document.admin)),
            queue=QueueConfig() if document.queue is None else QueueConfig(**dict(document.queue)),
            state_file=None if document.state_file is None else self._relative(document.state_file).absolute(),
        )

    def _check_state_file(self, path: Path) -> None:
        if path.is_dir():
            self._add(("state_file",), f"{path} is a folder; name a file in it, e.g. {path / 'state.json'}")
        elif not path.parent.is_dir():
            self._add(("state_file",), f"the folder {path.parent} does not exist")

    def _check_tls(self, loc: Loc, raw: dict[str, Any]) -> None:
        """The certificate and key load together (so a typo shows now, not at a client's STARTTLS)."""
        cert, key = _salvage(_PATH, raw.get("tls_cert")), _salvage(_PATH, raw.get("tls_key"))
        ca = _salvage(_PATH, raw.get("tls_client_ca"))
        if (cert is None) != (key is None):
            self._add((*loc, "tls_key" if key is None else "tls_cert"), "tls_cert and tls_key go together")
            return
        if cert is None:
            if ca is not None:
                self._add((*loc, "tls_client_ca"), "needs tls_cert and tls_key")
            if raw.get("require_tls_from") or raw.get("require_tls_for"):
                self._add((*loc, "require_tls_from" if raw.get("require_tls_from") else "require_tls_for"),
                          "TLS cannot be required without tls_cert and tls_key")
            return
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._relative(cert), self._relative(key))
        except (OSError, ssl.SSLError) as exc:
            self._add((*loc, "tls_cert"), f"cannot load {self._relative(cert)} with {self._relative(key)}: "
                                          f"{getattr(exc, 'strerror', None) or exc}")
        if ca is not None:
            try:
                context.load_verify_locations(self._relative(ca))
            except (OSError, ssl.SSLError) as exc:
                self._add((*loc, "tls_client_ca"), f"cannot load {self._relative(ca)}: "
                                                   f"{getattr(exc, 'strerror', None) or exc}")

    def _check_queue(self) -> None:
        queue = self.data.get("queue")
        if not isinstance(queue, dict):
            return
        pool = _salvage(_NAME, queue.get("bounce_pool"))
        if pool is not None and self._is_unknown_pool(pool):
            self._add(("queue", "bounce_pool"), f"unknown pool {_quote(pool)}{self._pool_hint()}")
        low, high = queue.get("retry_min_seconds", 5.0), queue.get("retry_max_seconds", 600.0)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            self._add(("queue", "retry_max_seconds"), f"must be >= retry_min_seconds ({low:g}), got {high:g}")

    def _admin_token(self, admin: _AdminTable) -> str | None:
        if admin.token_file is None:
            return admin.token
        # Checked in pass 2 (_check_admin); unreadable files never get here.
        return self._relative(admin.token_file).read_text().strip()

    def _check_admin(self) -> None:
        """A token, from `token` or `token_file`, is required off loopback: the API changes state."""
        admin = self.data.get("admin")
        if not isinstance(admin, dict):
            return
        token = admin.get("token")
        file = _salvage(_PATH, admin.get("token_file"))
        if token is not None and file is not None:
            self._add(("admin", "token_file"), "give token or token_file, not both")
        if file is not None:
            try:
                text = self._relative(file).read_text().strip()
            except OSError as exc:
                self._add(("admin", "token_file"), f"cannot read {self._relative(file)}: {exc.strerror or exc}")
                return
            if not 16 <= len(text) <= 256 or not text.isascii() or any(c <= " " for c in text):
                self._add(("admin", "token_file"), "the token must be 16 to 256 printable characters")
                return
            token = text
        listen = _salvage(_LISTEN, admin.get("listen"))
        if listen is not None and token is None and not _is_loopback(listen.host):
            self._add(("admin", "listen"), f"{listen} is not loopback: set token or token_file, "
                                           "so that only operators can change servers and pools")

    def _vip(self, name: str, table: _VipTable, routes: RouteTable | None,
             access: AccessMap | None = None) -> VipConfig:
        fields = dict(table)
        fields.update(
            banner=table.banner.replace("$hostname", table.hostname),
            routes=routes,
            routes_file=None if table.routes is None else self._relative(table.routes).absolute(),
            privacy=_expand_privacy(table.privacy),
            access=access,
            access_file=None if table.access is None else self._relative(table.access).absolute(),
            relay_domains=frozenset(table.relay_domains),
            trusted_networks=tuple(ipaddress.ip_network(n, strict=False) for n in table.trusted_networks),
            dnsbl=tuple(DnsblZone(z.zone.lower(), z.weight, z.accept) for z in table.dnsbl),
            tls_cert=None if table.tls_cert is None else self._relative(table.tls_cert).absolute(),
            tls_key=None if table.tls_key is None else self._relative(table.tls_key).absolute(),
            tls_client_ca=None if table.tls_client_ca is None else self._relative(table.tls_client_ca).absolute(),
            require_tls_from=tuple(ipaddress.ip_network(n, strict=False) for n in table.require_tls_from),
            require_tls_for=frozenset(d.lower().lstrip(".") for d in table.require_tls_for),
            accept_proxy_from=tuple(ipaddress.ip_network(n, strict=False) for n in table.accept_proxy_from),
        )
        return VipConfig(name=name, **fields)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _health(table: _HealthTable | None) -> HealthConfig:
    if table is None:
        return HealthConfig()
    fields = dict(table)
    fields["timeout_seconds"] = table.timeout_seconds or table.interval_seconds
    fields["agent_interval_seconds"] = table.agent_interval_seconds or table.interval_seconds
    return HealthConfig(**fields)


def _pool(name: str, table: _PoolTable, relative: Callable[[str], Path]) -> PoolConfig:
    servers = tuple(
        ServerSpec(
            name=server.name or str(server.address),
            endpoint=server.address,
            weight=server.weight,
            backup=server.backup,
            max_sessions=server.max_sessions,
            agent_port=server.agent_port,
        )
        for server in table.servers
    )
    return PoolConfig(name=name, **{**dict(table), "servers": servers, "health": _health(table.health),
                                    "tls_ca": None if table.tls_ca is None else relative(table.tls_ca).absolute()})


def _expand_privacy(flags: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(flags)
    return (chosen - {"goaway"}) | _GOAWAY if "goaway" in chosen else chosen


def _without_echoes(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """Drop "too short" errors caused only by a bad item.

    pydantic counts items after validation, so ["10.0.0.11"] is both a bad address and an
    empty list; the second error would only mislead.
    """
    # A list's loc is whatever precedes an integer index in an item's loc.
    lists_with_bad_items = {
        err["loc"][:index] for err in errors for index, part in enumerate(err["loc"]) if isinstance(part, int)
    }
    return [err for err in errors if not (err["type"] == "too_short" and err["loc"] in lists_with_bad_items)]


def _salvage(adapter: TypeAdapter[T], value: object) -> T | None:
    """`value` if valid, else None: pass 1 has already reported why it is not."""
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def _tables(data: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """The sub-tables of `data[key]` that are tables; pass 1 reports anything else."""
    section = data.get(key)
    if not isinstance(section, dict):
        return {}
    return {name: table for name, table in section.items() if isinstance(table, dict)}


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib (3.11) only puts the position in the message: "Invalid value (at line 3, column 8)".
        match = _TOML_POSITION_RE.fullmatch(str(exc))
        if match is None:
            raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from exc
        where = f"{path}:{match['line']}:{match['column']}"
        raise ConfigError([f"{where}: TOML syntax error: {match['reason']}"]) from exc


# --- Error text --------------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _reason(err: ErrorDetails) -> str:
    """A short reason for one pydantic error, in TOML's words."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "missing (required)"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_show(value)}"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {_bound(ctx[_BOUND_KEYS[kind]])}, got {_show(value)}"
    if kind == "literal_error":
        return f"expected {str(ctx['expected']).replace(chr(39), chr(34))}, got {_show(value)}"
    if kind == "too_short":
        return (
            "must not be empty" if ctx.get("min_length") == 1 else f"needs at least {ctx['min_length']} items"
        )
    return err["msg"]


def _bound(limit: object) -> str:
    # pydantic hands float bounds for float fields: "> 0", not "> 0.0".
    return str(int(limit)) if isinstance(limit, float) and limit.is_integer() else str(limit)


def _show(value: object) -> str:
    """`value` as the operator wrote it, or the kind of thing it is when it is big."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (datetime, date, time)):
        return f"a date/time ({value.isoformat()})"
    return repr(value)


def _format(path: Path, loc: Loc, reason: str) -> str:
    key = _key_path(loc)
    return f"{path}: {key}: {reason}" if key else f"{path}: {reason}"


def _key_path(loc: Loc) -> str:
    """("pool", "mx", "servers", 0, "address") -> 'pool.mx.servers[0].address', quoting odd keys."""
    # pydantic marks an invalid dict key by appending "[key]" after it.
    parts = loc[:-1] if loc and loc[-1] == "[key]" else loc
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY_RE.fullmatch(part) else _quote(part)
            text += f".{key}" if text else key
    return text


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
