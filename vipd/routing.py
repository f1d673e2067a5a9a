"""Recipient-domain routing: read a sendmail-style mailertable and find the pool for a domain.

Rule: this module parses and looks up; only `load_routes` touches the file system.

One entry a line, ``KEY  POOL``; blank lines and lines starting with ``#`` are ignored.
Keys follow sendmail's mailertable semantics:

    example.com     that domain exactly
    .example.com    any subdomain of example.com, but not example.com itself
    .               catch-all
    [192.0.2.1]     an address literal (also [IPv6:2001:db8::1]), matched exactly

`RouteTable.lookup` tries the domain itself, then its parents nearest first
(``.sub.example.com``, ``.example.com``, ``.com``), then ``.``. Keys and domains are
case-insensitive and a trailing dot is ignored. Pool names are ``[A-Za-z0-9_.-]+``;
whether the pools exist is for the caller (vipd.config) to check.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CATCH_ALL", "RouteTable", "RoutesError", "load_routes", "parse_routes"]

CATCH_ALL = "."

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_POOL_RE = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_DOMAIN = 253  # RFC 1035 section 2.3.4, without the trailing dot

Entry = tuple[str, str, int]


class RoutesError(ValueError):
    """A mailertable could not be read or parsed; `errors` holds one "source:line: reason" each.

    `table` holds the good lines of a file that was read, so a caller can still check them
    (vipd.config reports unknown pools there too); it is None when the file could not be read.
    """

    def __init__(self, errors: list[str], table: RouteTable | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)
        self.table = table


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Parsed mailertable: `entries` are (key, pool, line number) in file order.

    Keys are in the normalized form parse_routes gives (lowercase, no trailing dot,
    canonical literals); build tables with parse_routes rather than by hand.
    """

    entries: tuple[Entry, ...] = ()
    _index: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Private and never mutated after this point, so a plain dict keeps the table picklable.
        object.__setattr__(self, "_index", {key: pool for key, pool, _ in self.entries})

    def lookup(self, domain: str) -> str | None:
        """Return the pool for `domain`, or None when no key (not even ".") matches."""
        for key in _candidates(_normalize_domain(domain)):
            pool = self._index.get(key)
            if pool is not None:
                return pool
        return None

    def names(self, domain: str) -> bool:
        """Does a key other than the catch-all "." name ``domain``? Such domains are ours for relay
        control; the catch-all only picks a pool, it never makes every domain relayable."""
        return any(key in self._index for key in _candidates(_normalize_domain(domain))
                   if key != CATCH_ALL)

    def pools(self) -> frozenset[str]:
        """Every pool the table names."""
        return frozenset(pool for _, pool, _ in self.entries)


def parse_routes(text: str, source: str) -> RouteTable:
    """Parse mailertable `text`; `source` names it in errors. Raises RoutesError listing every bad line."""
    entries: list[Entry] = []
    errors: list[str] = []
    first_seen: dict[str, int] = {}
    # split("\n") rather than splitlines(): the latter also breaks on \f, \x1c..., skewing line numbers.
    for lineno, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        key, pool, reasons = _parse_line(fields, first_seen)
        errors.extend(f"{source}:{lineno}: {reason}" for reason in reasons)
        if key and key not in first_seen:
            # Even on a bad line: a later line with the same key is still a duplicate.
            first_seen[key] = lineno
        if not reasons:
            entries.append((key, pool, lineno))
    table = RouteTable(tuple(entries))
    if errors:
        raise RoutesError(errors, table)
    return table


def load_routes(path: Path) -> RouteTable:
    """Read and parse the mailertable at `path` (UTF-8); errors name the path as given."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutesError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise RoutesError([f"{path}: not UTF-8 text (byte offset {exc.start})"]) from exc
    return parse_routes(text, str(path))


def _parse_line(fields: list[str], first_seen: dict[str, int]) -> tuple[str, str, list[str]]:
    """Check one non-comment line; returns (key, pool, reasons), reasons empty when it is good."""
    raw_key, values = fields[0], fields[1:]
    reasons: list[str] = []
    key = _normalize_key(raw_key)
    if key is None:
        reasons.append(
            f"bad key {_quote(raw_key)}: expected a domain, .domain, "
            '"." or an address literal such as [192.0.2.1]'
        )
    elif key in first_seen:
        reasons.append(f"duplicate key {_quote(raw_key)} (first on line {first_seen[key]})")
    pool = values[0] if values else ""
    if not values:
        reasons.append(f"missing value: {_quote(raw_key)} names no pool")
    elif not _POOL_RE.fullmatch(pool):
        reasons.append(f'invalid pool name {_quote(pool)}: use letters, digits, "_", "." and "-"')
    if len(values) > 1:
        extra = " ".join(values[1:])
        reasons.append(f"extra fields after the pool name: {_quote(extra)} (comments go on their own line)")
    return key or "", pool, reasons


def _normalize_key(raw: str) -> str | None:
    """Canonical form of a mailertable key, or None if it is not a valid key."""
    key = raw.lower()
    if key == CATCH_ALL:
        return key
    key = key.removesuffix(".")
    if key.startswith("["):
        return _normalize_literal(key)
    if key.startswith("."):
        return "." + key[1:] if _is_domain(key[1:]) else None
    return key if _is_domain(key) else None


def _normalize_domain(domain: str) -> str:
    """Canonical form of a looked-up domain; unlike keys, anything is accepted."""
    name = domain.strip().lower().removesuffix(".")
    if name.startswith("["):
        return _normalize_literal(name) or name
    return name


def _normalize_literal(text: str) -> str | None:
    """Canonical form of a lowercase "[192.0.2.1]" or "[ipv6:...]", so equal addresses compare equal."""
    if not text.endswith("]"):
        return None
    body = text[1:-1]
    try:
        if body.startswith("ipv6:"):
            return f"[ipv6:{ipaddress.IPv6Address(body[5:])}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        return None


def _is_domain(name: str) -> bool:
    # An all-numeric last label is an unbracketed address, which sendmail would never match.
    return (
        len(name) <= _MAX_DOMAIN
        and _DOMAIN_RE.fullmatch(name) is not None
        and not name.rsplit(".", 1)[-1].isdigit()
    )


def _candidates(name: str) -> Iterator[str]:
    """Keys to try for `name`, most specific first."""
    if name:
        yield name
    if name and not name.startswith("["):
        labels = name.split(".")
        for start in range(1, len(labels)):
            yield "." + ".".join(labels[start:])
    yield CATCH_ALL


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
