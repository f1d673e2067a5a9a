"""Per-client limits and RefuseLA as pure decisions."""

from vipd.policy.limits import ClientLimiter, check_load


def test_concurrent_sessions_per_client():
    lim = ClientLimiter(max_concurrent=2)
    assert not lim.admit("192.0.2.1", 0).refuses
    assert not lim.admit("192.0.2.1", 0).refuses
    third = lim.admit("192.0.2.1", 0)
    assert third.refuses and third.reply.code == 421 and third.reply.status == "4.7.0"
    assert not lim.admit("192.0.2.2", 0).refuses          # another client is not affected
    lim.release("192.0.2.1")
    assert not lim.admit("192.0.2.1", 0).refuses
    assert lim.active("192.0.2.1") == 2


def test_connection_rate_per_minute_slides():
    lim = ClientLimiter(max_per_minute=3)
    for t in (0, 1, 2):
        assert not lim.admit("192.0.2.1", t).refuses
        lim.release("192.0.2.1")
    assert lim.admit("192.0.2.1", 3).check == "client_rate"
    assert not lim.admit("192.0.2.1", 62.5).refuses        # the first ones left the window
    lim.expire(1000)
    assert lim._recent == {}


def test_no_limits_means_no_refusal():
    lim = ClientLimiter()
    assert not any(lim.admit("192.0.2.1", 0).refuses for _ in range(1000))


def test_refuse_load():
    assert check_load(13.0, 12.0).reply.code == 421
    assert check_load(13.0, 12.0).reply.status == "4.3.2"
    assert not check_load(11.0, 12.0).refuses
    assert not check_load(99.0, None).refuses


def test_pregreet():
    from vipd.policy.limits import check_pregreet
    assert not check_pregreet(0).refuses
    verdict = check_pregreet(5)
    assert verdict.kind == "disconnect" and verdict.reply.code == 554 and verdict.check == "pregreet"


def test_refused_recipient_budget():
    from vipd.policy.limits import check_refused_recipients
    assert not check_refused_recipients(2, 3).refuses
    verdict = check_refused_recipients(3, 3)
    assert verdict.reply.code == 421 and verdict.reply.status == "4.7.0"
