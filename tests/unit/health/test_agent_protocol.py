"""Unit and property tests for the agent-check text protocol: parse_agent_reply and agent_reply."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from health.agent import agent_reply, parse_listen
from health.checks import AgentReport, parse_agent_reply


@pytest.mark.parametrize("text, state, weight", [
    ("up 75%\n", "up", 75),
    ("75%\r\n", None, 75),
    ("drain", "drain", None),
    ("down", "down", None),
    ("maint", "maint", None),
    ("up,ready,100%", "ready", 100),
    ("stopped #going away", "stopped", None),
    ("fail", "fail", None),
    ("UP 50%", "up", 50),
    ("  up \t 1%  ", "up", 1),
    ("up 50% maxconn:30", "up", 50),
    ("# only a comment", None, None),
    ("up #75%", "up", None),
    ("", None, None),
    ("bogus 12 50 %", None, None),
    ("up 10%\ndown 20%\n", "up", 10),
])
def test_parse_agent_reply(text, state, weight):
    report = parse_agent_reply(text)
    assert (report.state, report.weight_percent) == (state, weight)
    assert report.raw == text.split("\n", 1)[0].rstrip("\r")


def test_last_state_word_wins():
    assert parse_agent_reply("down up drain") == AgentReport("drain", None, "down up drain", "drain", "up")


def test_admin_and_operational_words_are_kept_apart():
    report = parse_agent_reply("drain up 50%")
    assert (report.admin, report.operational, report.weight_percent) == ("drain", "up", 50)
    assert (parse_agent_reply("down").admin, parse_agent_reply("down").operational) == (None, "down")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_parser_never_raises(text):
    report = parse_agent_reply(text)
    assert report.state is None or report.state in {"up", "down", "fail", "stopped", "ready", "drain", "maint"}
    assert report.weight_percent is None or report.weight_percent >= 0


# --- agent_reply ----------------------------------------------------------------------------------

@pytest.mark.parametrize("load, expected", [
    (0.0, "ready up 100%"),
    (-1.0, "ready up 100%"),
    (4.0, "ready up 50%"),
    (7.999999, "ready up 1%"),
    (8.0, "drain up"),
    (11.99, "drain up"),
    (12.0, "down"),
    (50.0, "down"),
])
def test_agent_reply_thresholds(load, expected):
    assert agent_reply(load, 8.0, 12.0) == expected


def test_equal_thresholds_go_straight_to_down():
    assert agent_reply(5.0, 5.0, 5.0) == "down"


@pytest.mark.parametrize("queue, refuse, load", [(0.0, 1.0, 0.5), (2.0, 1.0, 0.5), (8.0, 12.0, math.nan)])
def test_agent_reply_refuses_nonsense(queue, refuse, load):
    with pytest.raises(ValueError):
        agent_reply(load, queue, refuse)


queue_loads = st.floats(min_value=0.01, max_value=1000)


@given(queue_loads, st.data())
def test_weight_is_between_1_and_100_and_follows_the_formula(queue, data):
    load = data.draw(st.floats(min_value=0, max_value=queue, exclude_max=True))
    report = parse_agent_reply(agent_reply(load, queue, queue * 1.5))
    assert report.state == "up"
    assert report.weight_percent == 100 - math.ceil(99 * load / queue)
    assert 1 <= report.weight_percent <= 100


@given(queue_loads, st.floats(min_value=0, max_value=2000), st.floats(min_value=0, max_value=2000))
def test_weight_never_rises_with_load(queue, a, b):
    low, high = sorted((a, b))

    def weight(load: float) -> int:
        report = parse_agent_reply(agent_reply(load, queue, queue * 2))
        if report.operational == "down":
            return -1
        return 0 if report.admin == "drain" else report.weight_percent or 0

    assert weight(low) >= weight(high)


@pytest.mark.parametrize("text, expected", [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:8080", ("::1", 8080))])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected
