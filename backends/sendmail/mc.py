"""Turn a role and a few settings into the text a sendmail instance is built from: the ``.mc`` and its map sources.

Pure: no file, process or network access. ``render(settings)`` returns ``{file name: text}`` for one instance
folder; ``instance.py`` writes the files, runs m4 and makemap, and starts sendmail.

The three roles follow the layers of the email DMZ described in the 2003 SANS GSEC paper "A Secure Sendmail
Based DMZ for the Corporate Email Environment" ("the paper" below), whose sendmail directives the .mc uses:

- ``incoming``: serves the domain's MX. Accepts mail for ``relay_domains`` only and sends all of it to
  ``smart_host`` (the content-security VIP). Carries the compliance checks: access map, recipient blocklist,
  DNSBL zones, sender domain must resolve, ``delay_checks`` so a reject names the recipient. The paper's
  ``FEATURE(nullclient)`` would forward the same way; ``SMART_HOST`` keeps class R and relay_hosts_only in play.
- ``content``: accepts from ``relay_clients`` (the incoming layer, internal systems) and sends everything on
  to ``smart_host`` (the delivery VIP).
- ``delivery``: routes by ``mailertable`` (internal domains to the internal gateway) and sends the rest to
  ``smart_host`` (the outbound next hop), or by MX when there is none.

Rules for values: every value that passes through m4 is checked first, because m4 rescans a macro's body
when it expands it, a different number of times depending on where cf.m4 uses it, so quoting alone cannot
protect every value. A value is refused when it has a quote, a newline or another control character, or
contains a word that m4 or sendmail-cf define as a macro (``dnl``, ``esyscmd``, ``MAILER``, ``SMART_HOST``,
``confFOO``, ...). Relay domains and mailertable entries go into map files, which m4 never reads.

Next hops are always ``[address]`` literals, so sendmail makes no MX lookup for them. sendmail 8.17 has no
``host:port`` syntax (``:`` separates a list of fallback hosts), so a next hop on another port than 25 gets
its own mailer, a copy of ``relay`` or ``esmtp`` whose ``A=TCP $h PORT`` names the port.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "CF_M4", "PAPER_BANNER", "PAPER_PRIVACY_FLAGS", "ROLES", "Layout", "NextHop", "Settings", "SettingsError",
    "expected_cf_lines", "parse_next_hop", "render", "render_mc",
]

ROLES = ("incoming", "content", "delivery")
CF_M4 = "/usr/share/sendmail/cf/m4/cf.m4"  # Debian's sendmail-cf
PAPER_PRIVACY_FLAGS = ("goaway", "restrictqrun", "authwarnings", "noexpn", "novrfy", "needmailhelo")
PAPER_BANNER = "$j AUTHORIZED USE ONLY! UNSOLICITED EMAIL NOT WELCOME!"
KNOWN_PRIVACY_FLAGS = frozenset({
    "public", "needmailhelo", "needexpnhelo", "needvrfyhelo", "noexpn", "novrfy", "noverb", "noetrn",
    "restrictmailq", "restrictqrun", "restrictexpand", "noreceipts", "nobodyreturn", "goaway", "authwarnings",
    "noactualrecipient",
})
ACCESS_ACTIONS = ("OK", "RELAY", "REJECT", "DISCARD", "SKIP")

# Words m4 would expand inside a value: GNU m4's builtins, plus the bare words sendmail-cf defines (from
# ``dumpdef`` after cf.m4, its features and MAILER(smtp)). Other cf macros are caught by their shape below.
_M4_BUILTINS = frozenset("""
    builtin changecom changequote changeword debugfile debugmode decr define defn divert divnum dnl dumpdef
    errprint esyscmd eval format ifdef ifelse include incr index indir len m4exit m4wrap maketemp mkstemp
    patsubst popdef pushdef regexp shift sinclude substr syscmd sysval traceoff traceon translit undefine
    undivert unix windows os2 __file__ __gnu__ __line__ __program__ __unix__ __windows__ __os2__ lower strcasecmp
    CONCAT DOL DOMAIN FEATURE HACK MAILER OSTYPE POPDIVERT PUSHDIVERT SITECONFIG TEMPFILE UUCPSMTP VERSIONID
    WARNING
""".split())
_M4_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_USER = re.compile(r"[a-z][a-z0-9-]{0,31}")
_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
_TEXT = re.compile(r"[ !$%&*+./0-9:;<=>?@A-Z\[\]^_a-z{|}~-]+")  # printable ASCII less m4's quote, comment, comma, parens
_ACCESS_KEY = re.compile(r"(?:(?:Connect|From|To|Spam):)?[A-Za-z0-9._@+:\[\]-]+")
_ACCESS_ERROR = re.compile(r"ERROR:(?:[45]\.\d{1,3}\.\d{1,3}:)?[45]\d\d [ -~]{0,200}")
_NET_PREFIX = re.compile(r"\d{1,3}(?:\.\d{1,3}){0,3}|IPv6:[0-9A-Fa-f:]+")


class SettingsError(ValueError):
    """A setting that would give a broken or unsafe sendmail configuration; the message names it."""


def _m4_safe(name: str, value: str) -> str:
    """Refuse a value m4 would not copy verbatim (see the module docstring)."""
    if not value or not _TEXT.fullmatch(value):
        raise SettingsError(f"{name}: {value!r}: empty, or a character outside printable ASCII less ` ' \" # , ( ) \\")
    for word in _M4_NAME.findall(value):
        # sendmail-cf's internal macros all start with underscores then a capital (_ARG_, _MAILER_smtp_).
        if (word in _M4_BUILTINS or word.startswith("m4_") or re.match(r"(?:conf|_+)[A-Z]", word)
                or (word.isupper() and "_" in word)):
            raise SettingsError(f"{name}: {value!r}: the word {word!r} is an m4 or sendmail-cf macro name")
    return value


def _domain(name: str, value: str, *, leading_dot: bool = False) -> str:
    body = value[1:] if leading_dot and value.startswith(".") else value
    if len(value) > 253 or not _DOMAIN.fullmatch(body):
        raise SettingsError(f"{name}: {value!r} is not a domain name")
    return value.lower()


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SettingsError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _port(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SettingsError(f"{name}: expected a port 1-65535, got {value!r}")
    return value


def _ip(name: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise SettingsError(f"{name}: {value!r} is not an IP address") from None


@dataclass(frozen=True, slots=True)
class NextHop:
    """An SMTP next hop: an IP address (or a name the instance's hosts file knows) and a port."""

    host: str
    port: int = 25

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            _m4_safe("next hop", _domain("next hop", self.host))
        _port("next hop port", self.port)

    @property
    def literal(self) -> str:
        """The host in brackets: sendmail connects to it as given, with no MX lookup."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return f"[{self.host}]"
        return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"

    def route(self, kind: str) -> str:
        """``mailer:[host]`` for a smart host (``kind="relay"``) or a mailertable entry (``"esmtp"``)."""
        return f"{mailer_name(kind, self.port)}:{self.literal}"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_next_hop(text: str) -> NextHop:
    """``"127.0.0.1:2526"``, ``"[::1]:2526"`` or ``"127.0.0.1"`` (port 25)."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text.strip())
    if not match:
        raise SettingsError(f"next hop: {text!r}: expected HOST[:PORT] or [IPV6][:PORT]")
    host = match.group(1) or match.group(3)
    port = match.group(2) or match.group(4)
    return NextHop(host, int(port) if port else 25)


def mailer_name(kind: str, port: int) -> str:
    """The stock mailer for port 25; else a per-port copy named like ``relay2526``."""
    return kind if port == 25 else f"{kind}{port}"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each file of one instance lives: the .mc points sendmail at these, instance.py writes them."""

    directory: Path
    mc: Path
    cf: Path
    queue: Path
    pid_file: Path
    statistics: Path
    aliases: Path
    access: Path
    mailertable: Path
    relay_domains: Path
    local_host_names: Path
    hosts: Path
    service_switch: Path
    resolv_conf: Path
    nsswitch_conf: Path
    dev: Path
    maillog: Path
    traffic_log: Path
    output: Path

    @classmethod
    def of(cls, directory: Path) -> Layout:
        d = Path(directory)
        return cls(d, d / "sendmail.mc", d / "sendmail.cf", d / "queue", d / "sendmail.pid", d / "statistics",
                   d / "aliases", d / "access", d / "mailertable", d / "relay-domains", d / "local-host-names",
                   d / "hosts", d / "service.switch", d / "resolv.conf", d / "nsswitch.conf", d / "dev",
                   d / "maillog", d / "traffic.log", d / "sendmail.out")


@dataclass(frozen=True, slots=True)
class Settings:
    """One instance's configuration. Sequences may be given as lists or dicts; they are stored as tuples.

    Defaults follow the paper except where the lab differs, each said below.
    """

    role: str
    directory: Path
    port: int
    listen_address: str = "127.0.0.1"
    hostname: str = "mta.vipd.test"          # must contain a dot, else sendmail sleeps 60 s at start
    smart_host: NextHop | None = None
    relay_domains: tuple[str, ...] = ()      # class R: the domains this layer accepts mail for
    relay_clients: tuple[str, ...] = ()      # access ``Connect:PREFIX RELAY`` (127.0.0.1 always may relay)
    access: tuple[tuple[str, str], ...] = ()  # more access map entries, e.g. ("From:spammer@bad.example", "REJECT")
    mailertable: tuple[tuple[str, NextHop], ...] = ()
    dnsbl_zones: tuple[str, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()  # name -> address, resolved from the instance's hosts file
    dns_server: str | None = None            # None: no DNS at all, names come from ``hosts`` only
    privacy_flags: tuple[str, ...] = PAPER_PRIVACY_FLAGS
    banner: str = PAPER_BANNER               # sendmail inserts "ESMTP" after $j by itself
    max_message_bytes: int = 4_194_304
    max_daemon_children: int = 200
    # The paper's 3 suits a dedicated server; sendmail reads the whole machine's load average, and a
    # busy 2-core test machine passes 3 often, which would leave mail queued.
    queue_la: int = 50
    refuse_la: int = 80
    run_as_user: str | None = "mail"
    log_level: int = 9
    aliases: tuple[tuple[str, str], ...] = (("mailer-daemon", "postmaster"), ("postmaster", "root"))

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if self.role not in ROLES:
            raise SettingsError(f"role: {self.role!r}: expected one of {', '.join(ROLES)}")
        directory = PurePosixPath(str(self.directory))
        if not directory.is_absolute() or not _PATH.fullmatch(str(directory)):
            raise SettingsError(f"directory: {str(self.directory)!r}: expected an absolute path of [A-Za-z0-9._/+-]")
        _m4_safe("directory", str(directory))
        put("directory", Path(directory))
        _port("port", self.port)
        put("listen_address", _ip("listen_address", self.listen_address))
        _m4_safe("hostname", _domain("hostname", self.hostname))
        if "." not in self.hostname:
            raise SettingsError(f"hostname: {self.hostname!r}: needs a dot (sendmail sleeps 60 s on a short name)")
        if isinstance(self.smart_host, str):
            put("smart_host", parse_next_hop(self.smart_host))
        put("relay_domains", tuple(_domain("relay_domains", d) for d in _items(self.relay_domains)))
        for prefix in _items(self.relay_clients):
            if not _NET_PREFIX.fullmatch(prefix):
                raise SettingsError(f"relay_clients: {prefix!r}: expected an access-map prefix like 10.1 or 192.0.2.7")
        put("relay_clients", tuple(_items(self.relay_clients)))
        put("access", tuple(_access_entry(k, v) for k, v in _pairs(self.access)))
        put("mailertable", tuple(
            (_domain("mailertable", d, leading_dot=True), h if isinstance(h, NextHop) else parse_next_hop(h))
            for d, h in _pairs(self.mailertable)))
        put("dnsbl_zones", tuple(_m4_safe("dnsbl_zones", _domain("dnsbl_zones", z)) for z in _items(self.dnsbl_zones)))
        put("hosts", tuple((_domain("hosts", n), _ip("hosts", a)) for n, a in _pairs(self.hosts)))
        if self.dns_server is not None:
            put("dns_server", _ip("dns_server", self.dns_server))
        flags = tuple(_items(self.privacy_flags))
        for flag in flags:
            if flag not in KNOWN_PRIVACY_FLAGS:
                raise SettingsError(f"privacy_flags: {flag!r} is not a sendmail privacy flag")
        put("privacy_flags", flags)
        _m4_safe("banner", self.banner)
        for name in ("max_message_bytes", "max_daemon_children", "queue_la", "refuse_la", "log_level"):
            _positive(name, getattr(self, name))
        if self.run_as_user is not None and not _USER.fullmatch(self.run_as_user):
            raise SettingsError(f"run_as_user: {self.run_as_user!r} is not a user name")
        if self.run_as_user is not None:
            _m4_safe("run_as_user", self.run_as_user)
        aliases = tuple(_pairs(self.aliases))
        for name, target in aliases:
            if not re.fullmatch(r"[a-z0-9._+-]+", name) or not re.fullmatch(r"[A-Za-z0-9._+@-]+", target):
                raise SettingsError(f"aliases: {name!r}: {target!r}: expected a local name and one address")
        put("aliases", aliases)
        self._check_role()

    def _check_role(self) -> None:
        if self.role == "incoming" and not (self.relay_domains and self.smart_host):
            raise SettingsError("role incoming: needs relay_domains and a smart_host (the content-security VIP)")
        if self.role == "content" and not self.smart_host:
            raise SettingsError("role content: needs a smart_host (the delivery VIP)")
        if self.role == "delivery" and not self.mailertable:
            raise SettingsError("role delivery: needs mailertable entries (internal domains to the gateway)")
        if self.role != "delivery" and self.mailertable:
            raise SettingsError(f"role {self.role}: mailertable routing belongs to the delivery role")

    @property
    def layout(self) -> Layout:
        return Layout.of(self.directory)

    @property
    def uses_dns(self) -> bool:
        return self.dns_server is not None


def _items(value: Iterable[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _pairs(value: Mapping | Iterable) -> list[tuple]:
    return list(value.items()) if isinstance(value, Mapping) else [tuple(p) for p in value]


def _access_entry(key: str, action: str) -> tuple[str, str]:
    if not _ACCESS_KEY.fullmatch(key):
        raise SettingsError(f"access: {key!r} is not an access map key")
    if action not in ACCESS_ACTIONS and not _ACCESS_ERROR.fullmatch(action):
        raise SettingsError(f"access: {key}: {action!r}: expected {'|'.join(ACCESS_ACTIONS)} or ERROR:5xx text")
    return key, action


def _q(text: str) -> str:
    return f"`{text}'"


def _define(name: str, value: str | int) -> str:
    return f"define({_q(name)}, {_q(str(value))})dnl"


def _feature(name: str, *args: str) -> str:
    return f"FEATURE({', '.join(_q(a) for a in (name, *args))})dnl"


_MAILER_TEMPLATES = {  # Debian 8.17's stock relay and esmtp mailers, with the port added to A=
    "relay": "F=mDFMuXa8, S=EnvFromSMTP/HdrFromSMTP, R=MasqSMTP, E=\\r\\n, L=2040",
    "esmtp": "F=mDFMuXa, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP, E=\\r\\n, L=990",
}


def _mailer_definitions(settings: Settings) -> list[str]:
    wanted = sorted({("esmtp", hop.port) for _, hop in settings.mailertable}
                    | ({("relay", settings.smart_host.port)} if settings.smart_host else set()))
    # A raw cf line at the top level of an .mc is still scanned for macros; quoted, m4 copies it as it is.
    return [_q(f"M{mailer_name(kind, port)}, P=[IPC], {_MAILER_TEMPLATES[kind]}, T=DNS/RFC822/SMTP, A=TCP $h {port}")
            for kind, port in wanted if port != 25]


def render_mc(settings: Settings) -> str:
    s, paths = settings, settings.layout
    lines = [
        "divert(-1)",
        f"# sendmail {s.role} layer of the email DMZ on {s.listen_address}:{s.port}; generated, do not edit.",
        "divert(0)dnl",
        f"include({_q(CF_M4)})dnl",
        "OSTYPE(`linux')dnl",
        # No legacy mailers and their path tricks: relay abuse through ! and %.
        "undefine(`UUCP_RELAY')dnl",
        "undefine(`BITNET_RELAY')dnl",
        _define("confDOMAIN_NAME", s.hostname),
        # Instance folders may sit under /tmp, whose world-writable parent fails the safe-file checks.
        _define("confDONT_BLAME_SENDMAIL", "TrustStickyBit"),
        # Probing interfaces makes a PTR lookup per address; the instance only listens on one.
        _define("confDONT_PROBE_INTERFACES", "True"),
        _define("confSERVICE_SWITCH_FILE", paths.service_switch),
        _define("confHOSTS_FILE", paths.hosts),
        _define("confBIND_OPTS", "-DNSRCH -DEFNAMES"),
        _define("confTO_IDENT", "0s"),
        _define("QUEUE_DIR", paths.queue),
        _define("confPID_FILE", paths.pid_file),
        _define("STATUS_FILE", paths.statistics),
        _define("ALIAS_FILE", paths.aliases),
        _define("confCW_FILE", paths.local_host_names),
        _define("confCR_FILE", paths.relay_domains),
        # Else host status goes to a folder shared with every sendmail on the machine.
        "undefine(`confHOST_STATUS_DIRECTORY')dnl",
        _define("confSMTP_LOGIN_MSG", s.banner),
        _define("confPRIVACY_FLAGS", ",".join(s.privacy_flags)),
        _define("confMAX_MESSAGE_SIZE", s.max_message_bytes),
        _define("confMAX_DAEMON_CHILDREN", s.max_daemon_children),
        _define("confQUEUE_LA", s.queue_la),
        _define("confREFUSE_LA", s.refuse_la),
        _define("confLOG_LEVEL", s.log_level),
    ]
    if s.run_as_user:
        lines.append(_define("confRUN_AS_USER", s.run_as_user))
    if s.smart_host:
        lines.append(_define("SMART_HOST", s.smart_host.route("relay")))
    lines += [
        _feature("no_default_msa"),  # else an MSA listens on every address, port 587
        _feature("nocanonify"),
        _feature("smrsh"),
        _feature("use_cw_file"),     # an empty local-host-names: nothing is delivered on this host
        _feature("always_add_domain"),
        _feature("access_db", f"hash -T<TMPF> -o {paths.access}"),
        _feature("relay_hosts_only"),
        # The paper's blacklist_recipients; 8.17 renamed it and warns at every build under the old name.
        _feature("blocklist_recipients"),
    ]
    if s.role == "incoming":
        lines.append(_feature("delay_checks"))  # rejects come at RCPT, so the log names the recipient
    lines += [_feature("dnsbl", zone) for zone in s.dnsbl_zones]
    if s.mailertable:
        lines.append(_feature("mailertable", f"hash -o {paths.mailertable}"))
    lines += [
        f"DAEMON_OPTIONS({_q(_daemon_options(s))})dnl",
        "MAILER(`local')dnl",
        "MAILER(`smtp')dnl",
    ]
    definitions = _mailer_definitions(s)
    if definitions:
        lines += ["MAILER_DEFINITIONS", *definitions]
    return "\n".join(lines) + "\n"


def _daemon_options(s: Settings) -> str:
    family = ", Family=inet6" if ":" in s.listen_address else ""
    return f"Port={s.port}, Addr={s.listen_address}{family}, Name=MTA"


def expected_cf_lines(settings: Settings) -> list[str]:
    """Lines the .cf must contain word for word: proof that m4 copied the values and expanded none."""
    s, paths = settings, settings.layout
    lines = [f"Dj{s.hostname}", f"O SmtpGreetingMessage={s.banner}", f"O QueueDirectory={paths.queue}",
             f"O DaemonPortOptions={_daemon_options(s)}"]
    if s.smart_host:
        lines.append(f"DS{s.smart_host.route('relay')}")
    if s.run_as_user:
        lines.append(f"O RunAsUser={s.run_as_user}")
    return lines


def render(settings: Settings) -> dict[str, str]:
    """Every text file of one instance, by file name (the .mc and the sources of its maps and lists)."""
    s = settings
    access = [f"Connect:{prefix}\tRELAY" for prefix in s.relay_clients]
    access += [f"{key}\t{action}" for key, action in s.access]
    hosts = ["127.0.0.1\tlocalhost", f"{s.listen_address}\t{s.hostname} {s.hostname.split('.')[0]}"]
    hosts += [f"{address}\t{name}" for name, address in s.hosts]
    files = {
        "sendmail.mc": render_mc(s),
        "access": _lines(access),
        "relay-domains": _lines(s.relay_domains),
        "local-host-names": "",
        "hosts": _lines(hosts),
        "service.switch": _lines([f"hosts files{' dns' if s.uses_dns else ''}", "aliases files"]),
        "aliases": _lines(f"{name}: {target}" for name, target in s.aliases),
    }
    if s.mailertable:
        files["mailertable"] = _lines(f"{domain}\t{hop.route('esmtp')}" for domain, hop in s.mailertable)
    return files


def _lines(lines: Iterable[str]) -> str:
    text = "\n".join(lines)
    return text + "\n" if text else ""

