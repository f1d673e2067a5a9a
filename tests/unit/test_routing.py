"""Tests for vipd.routing: mailertable parsing, errors with file:line, and lookup semantics."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from vipd.routing import RouteTable, RoutesError, load_routes, parse_routes

TABLE = """\
# comment line
example.com          exact
.example.com         subdomains

.sub.example.com     deeper
   # indented comment
Mixed.Case.ORG.      mixed
[192.0.2.1]          literal4
[IPv6:2001:DB8:0::1] literal6
"""


@pytest.fixture
def table() -> RouteTable:
    return parse_routes(TABLE, "mt")


def errors_of(text: str, source: str = "mt") -> list[str]:
    with pytest.raises(RoutesError) as caught:
        parse_routes(text, source)
    return caught.value.errors


def test_entries_keep_normalized_keys_and_line_numbers(table: RouteTable) -> None:
    assert table.entries == (
        ("example.com", "exact", 2),
        (".example.com", "subdomains", 3),
        (".sub.example.com", "deeper", 5),
        ("mixed.case.org", "mixed", 7),
        ("[192.0.2.1]", "literal4", 8),
        ("[ipv6:2001:db8::1]", "literal6", 9),
    )


def test_pools_lists_every_pool_once() -> None:
    routes = parse_routes("a.test p1\nb.test p2\nc.test p1\n", "mt")
    assert routes.pools() == frozenset({"p1", "p2"})


def test_exact_key_does_not_match_subdomains(table: RouteTable) -> None:
    assert table.lookup("example.com") == "exact"
    assert table.lookup("other.com") is None


def test_dot_key_matches_subdomains_but_not_the_domain_itself() -> None:
    routes = parse_routes(".example.com sub\n", "mt")
    assert routes.lookup("a.example.com") == "sub"
    assert routes.lookup("a.b.example.com") == "sub"
    assert routes.lookup("example.com") is None
    assert routes.lookup("badexample.com") is None


def test_nearest_parent_wins(table: RouteTable) -> None:
    assert table.lookup("x.sub.example.com") == "deeper"
    # ".sub.example.com" is for subdomains only, so sub.example.com itself falls to ".example.com".
    assert table.lookup("sub.example.com") == "subdomains"
    assert table.lookup("other.example.com") == "subdomains"


def test_tld_key_and_catch_all_come_last() -> None:
    routes = parse_routes(".com tld\n. anything\nexample.com exact\n", "mt")
    assert routes.lookup("example.com") == "exact"
    assert routes.lookup("a.example.com") == "tld"
    assert routes.lookup("example.net") == "anything"


def test_without_catch_all_unmatched_is_none(table: RouteTable) -> None:
    assert table.lookup("example.net") is None


def test_keys_and_lookups_are_case_insensitive(table: RouteTable) -> None:
    assert table.lookup("EXAMPLE.Com") == "exact"
    assert table.lookup("mixed.case.org") == "mixed"
    assert table.lookup("A.Sub.Example.COM") == "deeper"


def test_trailing_dot_is_ignored_on_keys_and_lookups(table: RouteTable) -> None:
    assert table.lookup("example.com.") == "exact"
    assert table.lookup("MIXED.case.org.") == "mixed"
    routes = parse_routes(".example.org. sub\n", "mt")
    assert routes.lookup("a.example.org") == "sub"


def test_address_literals_match_exactly(table: RouteTable) -> None:
    assert table.lookup("[192.0.2.1]") == "literal4"
    assert table.lookup("[192.0.2.2]") is None
    assert table.lookup("192.0.2.1") is None
    # IPv6 literals compare as addresses, not as text.
    assert table.lookup("[ipv6:2001:db8::0:1]") == "literal6"


def test_literals_skip_the_parent_walk_but_reach_catch_all() -> None:
    # Built directly: ".9]" is no valid key, but it is what a parent walk over "[192.0.2.9]" would try.
    routes = RouteTable(((".9]", "wrong", 1), (".2.9]", "wrong", 2), (".", "catch", 3)))
    assert routes.lookup("[192.0.2.9]") == "catch"


def test_every_error_is_reported_with_source_and_line() -> None:
    text = "\n".join(
        [
            "good.example ok",  # 1
            "bad$key pool",  # 2
            "lonely.example",  # 3
            "extra.example pool trailing words",  # 4
            "GOOD.example. again",  # 5: same key as line 1
            "pool.example esmtp:[mx.example]",  # 6
        ]
    )
    errors = errors_of(text, "routes/mt")
    assert len(errors) == 5
    assert errors[0].startswith('routes/mt:2: bad key "bad$key"')
    assert errors[1] == 'routes/mt:3: missing value: "lonely.example" names no pool'
    assert errors[2].startswith('routes/mt:4: extra fields after the pool name: "trailing words"')
    assert errors[3] == 'routes/mt:5: duplicate key "GOOD.example." (first on line 1)'
    assert errors[4].startswith('routes/mt:6: invalid pool name "esmtp:[mx.example]"')


@pytest.mark.parametrize(
    "key",
    [
        "..",
        "..example.com",
        "-bad.example",
        "192.0.2.1",
        "[192.0.2.300]",
        "[example.com]",
        "a..b",
        "x" * 64 + ".com",
    ],
)
def test_bad_keys_are_refused(key: str) -> None:
    assert errors_of(f"{key} pool\n") == [
        f'mt:1: bad key "{key}": expected a domain, .domain, "." or an address literal such as [192.0.2.1]'
    ]


def test_error_message_joins_all_errors() -> None:
    with pytest.raises(RoutesError) as caught:
        parse_routes("a\nb\n", "mt")
    assert str(caught.value).splitlines() == caught.value.errors
    assert len(caught.value.errors) == 2


def test_error_keeps_the_good_lines() -> None:
    with pytest.raises(RoutesError) as caught:
        parse_routes("good.example ok\nbroken\n", "mt")
    assert caught.value.table is not None
    assert caught.value.table.lookup("good.example") == "ok"


def test_empty_and_comment_only_files_give_an_empty_table() -> None:
    routes = parse_routes("\n# nothing\n   \n", "mt")
    assert routes.entries == ()
    assert routes.lookup("example.com") is None


def test_crlf_line_endings_are_accepted() -> None:
    routes = parse_routes("a.example p1\r\nb.example p2\r\n", "mt")
    assert routes.lookup("b.example") == "p2"


def test_table_is_frozen_and_picklable(table: RouteTable) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.entries = ()  # type: ignore[misc]
    copy = pickle.loads(pickle.dumps(table))
    assert copy == table
    assert copy.lookup("a.example.com") == "subdomains"


def test_load_routes_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mailertable"
    path.write_text("example.com incoming\n. outgoing\n", encoding="utf-8")
    routes = load_routes(path)
    assert routes.lookup("example.com") == "incoming"
    assert routes.lookup("elsewhere.net") == "outgoing"


def test_load_routes_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "mailertable"
    path.write_text("# header\nexample.com\n", encoding="utf-8")
    with pytest.raises(RoutesError) as caught:
        load_routes(path)
    assert caught.value.errors == [f'{path}:2: missing value: "example.com" names no pool']


def test_load_routes_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(RoutesError) as caught:
        load_routes(path)
    assert caught.value.errors == [f"{path}: cannot read: No such file or directory"]
    assert caught.value.table is None


def test_names_counts_explicit_keys_never_the_catch_all() -> None:
    table = parse_routes("example.com a\n.sub.example.net b\n. c\n", "mt")
    assert table.names("example.com") and table.names("x.sub.example.net")
    assert not table.names("sub.example.net")       # ".sub" covers subdomains only
    assert not table.names("elsewhere.org")         # the catch-all picks a pool, nothing more
