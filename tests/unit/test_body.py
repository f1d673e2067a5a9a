"""The kept message body: memory while small, a temp file past the threshold, readable again and again."""

from vipd.net.body import Body


def test_small_body_stays_in_memory_and_rereads():
    body = Body(spill_bytes=100)
    body.append(b"abc")
    body.append(b"def")
    assert not body.spilled
    assert b"".join(body.chunks()) == b"abcdef" == b"".join(body.chunks())


def test_large_body_spills_and_appends_after_reading():
    body = Body(spill_bytes=10)
    body.append(b"x" * 8)
    body.append(b"y" * 8)
    assert body.spilled and body.size == 16
    assert b"".join(body.chunks()) == b"x" * 8 + b"y" * 8
    body.append(b"z")                         # reading must not disturb later writes
    assert b"".join(body.chunks()) == b"x" * 8 + b"y" * 8 + b"z"
    body.close()
    assert list(body.chunks()) == []
