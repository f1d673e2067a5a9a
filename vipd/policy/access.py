"""The sendmail access map (``FEATURE(access_db)``): parse its text form and answer its three lookups.

Rules: pure (only `load_access` reads a file; no DNS). Semantics follow sendmail's cf/README
("ANTI-SPAM CONFIGURATION CONTROL", "The access database") and its rulesets in cf/m4/proto.m4.

File: ``KEY<spaces or tabs>VALUE`` a line; blank lines and lines whose first non-blank character
is ``#`` are ignored. Keys and keywords are case-insensitive. A key may carry a tag, ``Connect:``,
``From:`` or ``To:``; an untagged key applies to every lookup, a tagged one only to its own.

    10.1.1  10.1  10          IPv4 network (1 to 4 octets); Connect: only
    IPv6:2001:db8             IPv6 network (leading colon groups); IPv6:2001:db8::1 is one address
    example.com               the host/domain and, walking up parents, everything below it
    [192.0.2.1]  [192.0.2]    an address literal: the client when it has no host name, or a
                              literal domain in an e-mail address (networks walk like IPv4)
    user@example.com          one address (From:/To:)
    user@                     that local part at any domain (From:/To:)

Values: ``OK``, ``RELAY``, ``REJECT``, ``DISCARD``, ``SKIP`` (stop this search as if nothing was
found; host, domain and network keys only), and ``ERROR:[D.S.N:]### text``, the text optionally in
double quotes (also the deprecated bare ``### text``). ``QUARANTINE:`` is refused: vipd does not
quarantine. A 5xx error rejects, a 4xx one tempfails, 421 disconnects; an error without an
enhanced status gets 5.7.1 / 4.7.1 (sendmail derives x.0.0); the status class must match the code.
REJECT answers ``550 5.7.1 Access denied``, or for a recipient sendmail's
``550 5.2.1 Mailbox disabled for this recipient``. Every bad line is an error: nothing is guessed.

Lookups (each tries ``Tag:key`` then ``key`` at every step; the first entry found decides):

* client: the host name and its parents (``[address]`` when the client has no name), then the
  IP address from most to least specific. Name first is sendmail's order (Basic_check_relay);
  pass only a forward-confirmed name, as sendmail's ``${client_name}`` is.
* sender and recipient: ``user@domain``, then ``user@``, then the domain and its parents
  (SearchList ``<F:> <U:> <D:>``); ``user+detail`` also tries ``user+*`` and ``user``.
  Recipient ``user@`` entries apply only to our own domains, as in FEATURE(blacklist_recipients)
  (the caller says which with ``local=``).
  The null sender is never looked up: check_mail accepts ``<>`` before consulting the map.

Relaying follows FEATURE(relay_hosts_only): `client_relays` and `relays_to` match host names
exactly, never "anything under this domain".
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..smtp.commands import Address
from ..smtp.replies import Reply
from .verdict import Verdict

__all__ = [
    "ACCESS_DENIED",
    "RECIPIENT_DISABLED",
    "CHECK_CLIENT",
    "CHECK_SENDER",
    "CHECK_RECIPIENT",
    "AccessError",
    "AccessMap",
    "parse_access",
    "load_access",
    "normalize_domain",
]

# --- replies --------------------------------------------------------------------------------
ACCESS_DENIED = Reply(550, "5.7.1", "Access denied")                         # REJECT: client, sender
RECIPIENT_DISABLED = Reply(550, "5.2.1", "Mailbox disabled for this recipient")  # REJECT: recipient

CHECK_CLIENT = "access_client"
CHECK_SENDER = "access_sender"
CHECK_RECIPIENT = "access_recipient"

_DEFAULT_STATUS = {4: "4.7.1", 5: "5.7.1"}
_DEFAULT_TEXT = "Access denied"
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; leave room for code, status and CRLF.
_MAX_TEXT = 480
_MAX_DOMAIN = 253

Tag = Literal["", "connect", "from", "to"]
# Key spaces keep IP networks, names, local parts and full addresses apart: a host name never
# matches an IPv4 network that happens to be spelt like one of its labels.
Space = Literal["ip", "name", "user", "full"]
Action = Literal["ok", "relay", "reject", "tempfail", "disconnect", "discard", "skip"]
_Key = tuple[str, str, str]          # (tag, space, canonical key)

_TAGS = {"connect": "connect", "from": "from", "to": "to"}
_KEYWORDS: dict[str, Action] = {
    "OK": "ok", "RELAY": "relay", "REJECT": "reject", "DISCARD": "discard", "SKIP": "skip",
}

_LINE_CHARS = re.compile(r"[^\t\x20-\x7e]")
_FIELDS = re.compile(r"([^ \t]+)(?:[ \t]+(.*))?")
_TAG_RE = re.compile(r"([a-z][a-z0-9_]*):(.*)", re.ASCII | re.IGNORECASE | re.DOTALL)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.ASCII)
_IPV4_PREFIX = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){0,3}", re.ASCII)
_IPV6_GROUPS = re.compile(r"[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){0,7}", re.ASCII)
_ATEXT = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*", re.ASCII)
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.ASCII)
_DSN = re.compile(r"([0-9])\.([0-9]{1,3})\.([0-9]{1,3}):(.*)", re.ASCII | re.DOTALL)
_CODE = re.compile(r"([0-9]{3})(?:[ \t]+(.*))?", re.ASCII | re.DOTALL)


class AccessError(ValueError):
    """An access map could not be read or parsed; `errors` holds every "source:line: reason"."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True, slots=True)
class _Entry:
    action: Action
    reply: Reply | None      # ERROR entries; REJECT's reply depends on the lookup
    line: int


@dataclass(frozen=True, slots=True)
class AccessMap:
    """A parsed access map. Build it with `parse_access` or `load_access`."""

    source: str = ""
    _entries: dict[_Key, _Entry] = field(default_factory=dict, repr=False, hash=False)

    def __len__(self) -> int:
        return len(self._entries)

    # --- the three lookups ------------------------------------------------------------------
    def lookup_client(self, ip: str, hostname: str | None = None) -> Verdict | None:
        """Connect: the host name and its parents, then the IP networks; None if nothing matches.

        `hostname` must be forward-confirmed (or None). A RELAY here means "accept and skip the
        other connection checks"; whether the client may relay is `client_relays`.
        Raises ValueError if `ip` is not an IP address.
        """
        address = _client_address(ip)
        entry = self._first("connect", (_name_candidates(_client_name(address, hostname)),
                                        _ip_candidates(address)))
        return _verdict(entry, CHECK_CLIENT)

    def lookup_sender(self, address: Address) -> Verdict | None:
        """From: ``user@domain``, ``user@``, then the domain and its parents; None for ``<>``."""
        if address.is_null:
            return None          # "we MUST accept <> (RFC 1123)": sendmail never looks it up
        return _verdict(self._first("from", _address_searches(address, user=True)), CHECK_SENDER)

    def lookup_recipient(self, address: Address, *, local: bool = True) -> Verdict | None:
        """To: ``user@domain``, ``user@`` (only when `local`: the domain is one of ours), then
        the domain and its parents. Pass ``local=False`` for a recipient in someone else's domain."""
        user = local or not address.domain
        return _verdict(self._first("to", _address_searches(address, user=user)), CHECK_RECIPIENT)

    # --- relay permission (relay_hosts_only) ------------------------------------------------
    def client_relays(self, ip: str, hostname: str | None = None) -> bool:
        """May this client relay by the map (sendmail's Relay_ok)? Yes if the most specific IP
        network entry is RELAY, or if the entry for exactly this host name is: with
        relay_hosts_only a domain entry names one host, never every host below it.
        Raises ValueError if `ip` is not an IP address."""
        address = _client_address(ip)
        entry = self._search("connect", _ip_candidates(address))
        if entry is not None and entry.action == "relay":
            return True
        name = normalize_domain(hostname) if hostname else ""
        # No name, no name check: sendmail refuses to relay for a client whose PTR lookup failed.
        entry = self._find("connect", "name", name) if name else None
        return entry is not None and entry.action == "relay"

    def relays_to(self, domain: str) -> bool:
        """Is there a ``To:`` or untagged RELAY entry for exactly `domain` (not a parent)?"""
        name = normalize_domain(domain)
        entry = self._find("to", "name", name) if name else None
        return entry is not None and entry.action == "relay"

    # --- search machinery -------------------------------------------------------------------
    def _find(self, tag: str, space: str, key: str) -> _Entry | None:
        # Tagged first, then the untagged entry, which applies to every lookup type.
        entry = self._entries.get((tag, space, key))
        return entry if entry is not None else self._entries.get(("", space, key))

    def _search(self, tag: str, candidates: Iterable[tuple[str, str]]) -> _Entry | None:
        """The first entry found along `candidates`; SKIP ends the search with nothing found."""
        for space, key in candidates:
            entry = self._find(tag, space, key)
            if entry is not None:
                return None if entry.action == "skip" else entry
        return None

    def _first(self, tag: str, searches: Iterable[Iterable[tuple[str, str]]]) -> _Entry | None:
        """Run the searches in order; the first one that finds something decides."""
        for candidates in searches:
            entry = self._search(tag, candidates)
            if entry is not None:
                return entry
        return None


def _verdict(entry: _Entry | None, check: str) -> Verdict | None:
    if entry is None:
        return None
    reply = entry.reply
    if entry.action == "reject" and reply is None:
        # sendmail's confRCPTREJ_MSG for recipients; the generic message for client and sender.
        reply = RECIPIENT_DISABLED if check == CHECK_RECIPIENT else ACCESS_DENIED
    return Verdict(entry.action, reply, check)   # type: ignore[arg-type]  # never "skip" here


# --- lookup candidates --------------------------------------------------------------------------

def _client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(ip.strip().removeprefix("[").removesuffix("]"))
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; match them as IPv4,
    # or every "10 RELAY" entry would silently miss them.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _client_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, hostname: str | None) -> str:
    # sendmail's ${client_name} is "[a.b.c.d]" when the address has no (confirmed) name.
    name = normalize_domain(hostname) if hostname else ""
    return name or f"[{_ip_prefixes(address)[0]}]"


def _ip_prefixes(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[str]:
    """Canonical network keys for `address`, most specific first."""
    if isinstance(address, ipaddress.IPv4Address):
        parts = str(address).split(".")
        return [".".join(parts[:n]) for n in range(4, 0, -1)]
    # Groups without leading zeros, never "::"-compressed: a network key is a run of leading groups.
    groups = [format(int(group, 16), "x") for group in address.exploded.split(":")]
    return ["ipv6:" + ":".join(groups[:n]) for n in range(8, 0, -1)]


def _ip_candidates(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Iterator[tuple[str, str]]:
    for key in _ip_prefixes(address):
        yield "ip", key


def _name_candidates(name: str) -> Iterator[tuple[str, str]]:
    """A name and its parents; an address literal walks its networks instead (sendmail's D)."""
    if not name:
        return
    if name.startswith("["):
        address = _literal_address(name)
        if address is None:
            yield "name", name           # a general literal: matched exactly
        else:
            for key in _ip_prefixes(address):
                yield "name", f"[{key}]"
        return
    labels = name.split(".")
    for start in range(len(labels)):
        yield "name", ".".join(labels[start:])


def _local_forms(local: str) -> list[str]:
    """``user+detail`` -> user+detail, user+*, user (sendmail's F and U rulesets)."""
    canon = _canon_local(local)
    base, plus, _ = canon.partition("+")
    if plus and base:
        return [canon, base + "+*", base]
    return [canon]


def _address_searches(address: Address, *, user: bool) -> list[list[tuple[str, str]]]:
    forms = _local_forms(address.local)
    domain = normalize_domain(address.domain)
    searches: list[list[tuple[str, str]]] = []
    if domain:
        searches.append([("full", f"{form}@{domain}") for form in forms])
    if user:
        searches.append([("user", form) for form in forms])
    if domain:
        searches.append(list(_name_candidates(domain)))
    return searches


# --- normal forms ------------------------------------------------------------------------------

def normalize_domain(domain: str) -> str:
    """Lower-case, no trailing dot; address literals canonical (``[ipv6:2001:db8:0:0:0:0:0:1]``)
    so that equal addresses compare equal. Anything else is returned lower-cased as it is."""
    name = domain.strip().lower().removesuffix(".")
    if name.startswith("["):
        address = _literal_address(name)
        if address is not None:
            return f"[{_ip_prefixes(address)[0]}]"
    return name


def _literal_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not (text.startswith("[") and text.endswith("]")):
        return None
    body = text[1:-1].lower()
    try:
        if body.startswith("ipv6:"):
            return ipaddress.IPv6Address(body[5:])
        return ipaddress.IPv4Address(body)
    except ValueError:
        return None


def _canon_local(local: str) -> str:
    """Lower-case; ``"user"`` and ``user`` are one mailbox (RFC 5321 4.1.2), so unquote when the
    content is a plain dot-atom: otherwise quoting would slip past a ``user@`` entry."""
    local = local.lower()
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = re.sub(r"\\(.)", r"\1", local[1:-1])
        if _DOT_ATOM.fullmatch(inner):
            return inner
    return local


# --- parsing -----------------------------------------------------------------------------------

def parse_access(text: str, source: str) -> AccessMap:
    """Parse access map `text`; `source` names it in errors. Raises AccessError listing every bad line."""
    entries: dict[_Key, _Entry] = {}
    errors: list[str] = []
    # split("\n"), not splitlines(): the latter also breaks on \f, \x1c..., skewing line numbers.
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.removesuffix("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        key, entry, reasons = _parse_line(line, lineno)
        if key is not None and key in entries:
            reasons.append(f"duplicate key (first on line {entries[key].line})")
        errors.extend(f"{source}:{lineno}: {reason}" for reason in reasons)
        if key is not None and entry is not None and not reasons:
            entries[key] = entry
    if errors:
        raise AccessError(errors)
    return AccessMap(source, entries)


def load_access(path: str | Path) -> AccessMap:
    """Read and parse the access map at `path` (UTF-8 text); errors name the path as given."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AccessError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise AccessError([f"{path}: not UTF-8 text (byte offset {exc.start})"]) from exc
    return parse_access(text, str(path))


def _parse_line(line: str, lineno: int) -> tuple[_Key | None, _Entry | None, list[str]]:
    """One non-comment line -> (key, entry, reasons); reasons is empty when the line is good."""
    bad = _LINE_CHARS.search(line)
    if bad:
        # Keys are ASCII and reply text goes on the wire: a CR or NUL there would forge replies.
        return None, None, [f"control or non-ASCII character {bad.group()!r} in column {bad.start() + 1}"]
    match = _FIELDS.fullmatch(line)
    assert match is not None     # the line is non-empty and starts with a non-blank
    raw_key, raw_value = match.group(1), (match.group(2) or "").strip(" \t")
    reasons: list[str] = []
    key, reason = _parse_key(raw_key)
    if reason:
        reasons.append(reason)
    entry: _Entry | None = None
    if not raw_value:
        reasons.append(f"missing value after {_quote(raw_key)}")
    else:
        entry, reason = _parse_value(raw_value, lineno)
        if reason:
            reasons.append(reason)
    if key is not None and entry is not None and entry.action == "skip" and key[1] in ("user", "full"):
        reasons.append("SKIP is only for host, domain and network keys, not e-mail addresses")
    return key, entry, reasons


def _parse_key(raw: str) -> tuple[_Key | None, str | None]:
    tag = ""
    body = raw
    match = _TAG_RE.fullmatch(raw)
    if match and match.group(1).lower() != "ipv6":
        name = match.group(1).lower()
        if name not in _TAGS:
            return None, f"unsupported tag {_quote(match.group(1) + ':')}: vipd knows Connect:, From: and To:"
        tag, body = _TAGS[name], match.group(2)
        if not body:
            return None, f"nothing after the tag in {_quote(raw)}"
    parsed = _parse_key_body(body.lower())
    if isinstance(parsed, str):
        return None, f"bad key {_quote(raw)}: {parsed}"
    space, canon = parsed
    if space == "ip" and tag not in ("", "connect"):
        return None, (f"bad key {_quote(raw)}: an IP network only matches Connect: lookups "
                      "(an address literal in an e-mail address is written [192.0.2.1])")
    if space in ("user", "full") and tag == "connect":
        return None, (f"bad key {_quote(raw)}: Connect: keys are host names or IP networks, "
                      "not e-mail addresses")
    return (tag, space, canon), None


def _parse_key_body(body: str) -> tuple[str, str] | str:
    """(space, canonical key) or the reason the key is bad."""
    if body.startswith("ipv6:"):
        canon = _ipv6_key(body[5:])
        return ("ip", canon) if canon else "expected IPv6: and colon groups, e.g. IPv6:2001:db8"
    if body.startswith("["):
        canon = _literal_key(body)
        return ("name", canon) if canon else "expected an address literal such as [192.0.2.1] or [192.0.2]"
    if body == "<>":
        return "the null sender <> is always accepted (RFC 5321 4.5.5); sendmail never looks it up"
    if body.startswith("@"):
        return "@domain is not access map syntax: write the domain alone, which also covers its subdomains"
    if "@" in body:
        return _address_key(body)
    if _IPV4_PREFIX.fullmatch(body):
        canon = _ipv4_key(body)
        return ("ip", canon) if canon else "IPv4 octets are 0-255 without leading zeros"
    name = body.removesuffix(".")
    if name.startswith("."):
        return "a leading dot needs FEATURE(lookupdotdomain), which vipd does not have; " \
               "a plain domain already covers its subdomains"
    if not _is_domain(name):
        return "expected an IP network, host or domain name, user@domain or user@"
    return "name", name


def _address_key(body: str) -> tuple[str, str] | str:
    local, _, domain = body.rpartition("@")
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        return f"bad local part {_quote(local)}"
    canon_local = _canon_local(local)
    if not domain:
        return "user", canon_local
    if domain.startswith("["):
        canon = normalize_domain(domain)
        if _literal_address(canon) is None:
            return f"bad address literal {_quote(domain)}"
        return "full", f"{canon_local}@{canon}"
    domain = domain.removesuffix(".")
    if not _is_domain(domain):
        return f"bad domain {_quote(domain)}"
    return "full", f"{canon_local}@{domain}"


def _is_domain(name: str) -> bool:
    # An all-numeric last label is a mistyped network (or a 5-octet one), never a host name.
    return (len(name) <= _MAX_DOMAIN and _DOMAIN_RE.fullmatch(name) is not None
            and not name.rsplit(".", 1)[-1].isdigit())


def _ipv4_key(body: str) -> str | None:
    octets = body.split(".")
    if any(int(o) > 255 or (len(o) > 1 and o[0] == "0") for o in octets):
        return None
    return body


def _ipv6_key(body: str) -> str | None:
    """``2001:db8`` is a network (leading groups); with ``::`` it is one full address."""
    if "::" in body or "." in body:
        try:
            address = ipaddress.IPv6Address(body)
        except ValueError:
            return None
        if address.ipv4_mapped is not None:
            return None      # clients arrive as IPv4 (see _client_address): this would never match
        return _ip_prefixes(address)[0]
    if not _IPV6_GROUPS.fullmatch(body):
        return None
    return "ipv6:" + ":".join(format(int(group, 16), "x") for group in body.split(":"))


def _literal_key(body: str) -> str | None:
    if not body.endswith("]"):
        return None
    inner = body[1:-1]
    if inner.startswith("ipv6:"):
        canon = _ipv6_key(inner[5:])
    else:
        canon = _ipv4_key(inner) if _IPV4_PREFIX.fullmatch(inner) else None
    return f"[{canon}]" if canon else None


def _parse_value(raw: str, lineno: int) -> tuple[_Entry | None, str | None]:
    words = raw.split()
    keyword = words[0].upper()
    if keyword in _KEYWORDS:
        if len(words) > 1:
            extra = _quote(" ".join(words[1:]))
            return None, f"unexpected text after {keyword}: {extra} (comments go on their own line)"
        return _Entry(_KEYWORDS[keyword], None, lineno), None
    upper = raw.upper()
    if upper.startswith("ERROR:"):
        return _parse_error(raw[6:], lineno)
    if upper.startswith("QUARANTINE:"):
        return None, "QUARANTINE is not supported: vipd does not quarantine"
    if raw[0].isdigit() or raw.startswith('"'):
        return _parse_error(raw, lineno)        # the deprecated "### any text" form
    return None, (f"unknown value {_quote(raw)}: expected OK, RELAY, REJECT, DISCARD, SKIP "
                  "or ERROR:[D.S.N:]### text")


def _parse_error(rest: str, lineno: int) -> tuple[_Entry | None, str | None]:
    """``[D.S.N:]### text``, with the whole, or the part after D.S.N:, optionally in quotes."""
    body, reason = _unquote(rest.strip(" \t"))
    if reason:
        return None, reason
    status = None
    dsn = _DSN.fullmatch(body)
    if dsn:
        status = f"{dsn.group(1)}.{int(dsn.group(2))}.{int(dsn.group(3))}"
        body, reason = _unquote(dsn.group(4).strip(" \t"))
        if reason:
            return None, reason
    code_match = _CODE.fullmatch(body)
    if not code_match:
        return None, f"expected an SMTP reply code (4xx or 5xx) and text, got {_quote(body)}"
    code = int(code_match.group(1))
    if not 400 <= code <= 599:
        return None, f"reply code {code} is not 4xx or 5xx"
    if status is not None and status[0] != str(code // 100):
        return None, f"enhanced status {status} does not match reply code {code}"
    text = (code_match.group(2) or "").strip(" \t") or _DEFAULT_TEXT
    if len(text) > _MAX_TEXT:
        return None, f"reply text longer than {_MAX_TEXT} characters"
    reply = Reply(code, status or _DEFAULT_STATUS[code // 100], text)
    action: Action = "disconnect" if code == 421 else "tempfail" if code < 500 else "reject"
    return _Entry(action, reply, lineno), None


def _unquote(text: str) -> tuple[str, str | None]:
    if not text.startswith('"'):
        return text, None
    if len(text) < 2 or not text.endswith('"'):
        return "", f"unbalanced quote in {_quote(text)}"
    return text[1:-1].strip(" \t"), None


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
