"""Log line formatting: values that could break a logfmt line are quoted and escaped."""

import io

from vipd.log import LogBuffer, fmt, quote


def test_quote_plain_and_hostile_values():
    assert quote("abc") == "abc"
    assert quote("a b") == '"a b"'
    assert quote('x"y') == '"x\\"y"'
    assert quote("line\nbreak") == '"line\\x0abreak"'
    assert quote("") == '""'


def test_fmt_skips_none_and_keeps_order():
    assert fmt(a=1, b=None, c="x y") == 'a=1 c="x y"'


def test_buffer_without_loop_writes_at_once_and_filters_level():
    out = io.StringIO()
    log = LogBuffer(out, level="info")
    log.debug("hidden")
    log.info("shown")
    assert "vipd: shown" in out.getvalue() and "hidden" not in out.getvalue()
