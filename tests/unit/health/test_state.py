"""Unit and property tests for health.state: rise/fall counters flip exactly when run lengths say so."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from health.state import HealthState

counts = st.integers(min_value=1, max_value=6)
results = st.lists(st.booleans(), max_size=60)


def expected_flips(results: list[bool], rise: int, fall: int, up: bool) -> list[tuple[int, str]]:
    """The model, by runs: a run of equal results that disagrees with the state flips it at its
    ``rise``-th/``fall``-th element; a run that agrees (or is too short) changes nothing."""
    flips: list[tuple[int, str]] = []
    start = 0
    for value, run in itertools.groupby(results):
        length = len(list(run))
        need = fall if up else rise
        if value != up and length >= need:
            flips.append((start + need - 1, "up" if value else "down"))
            up = value
        start += length
    return flips


@given(results, counts, counts, st.booleans())
def test_flips_exactly_when_the_run_lengths_say_so(seq, rise, fall, up):
    state = HealthState(rise=rise, fall=fall, up=up)
    got = [(i, t) for i, ok in enumerate(seq) if (t := state.observe(ok)) is not None]
    assert got == expected_flips(seq, rise, fall, up)


@given(results, counts, counts, st.booleans())
def test_up_matches_the_last_transition_and_consecutive_stays_below_threshold(seq, rise, fall, up):
    state = HealthState(rise=rise, fall=fall, up=up)
    current = up
    for ok in seq:
        transition = state.observe(ok)
        if transition is not None:
            current = transition == "up"
        assert state.up == current
        assert 0 <= state.consecutive < (fall if state.up else rise)


def test_defaults_are_haproxy_rise_2_fall_3():
    state = HealthState()
    assert (state.rise, state.fall, state.up, state.consecutive) == (2, 3, True, 0)
    assert [state.observe(False) for _ in range(3)] == [None, None, "down"]
    assert not state.up
    assert [state.observe(True) for _ in range(2)] == [None, "up"]
    assert state.up


def test_one_success_resets_the_failure_count():
    state = HealthState(fall=3)
    for ok in (False, False, True, False, False):
        assert state.observe(ok) is None
    assert state.consecutive == 2
    assert state.observe(False) == "down"
    assert state.consecutive == 0


def test_starting_down_needs_rise_successes():
    state = HealthState(rise=1, up=False)
    assert state.observe(False) is None
    assert state.observe(True) == "up"


@pytest.mark.parametrize("kw", [{"rise": 0}, {"fall": 0}, {"rise": -1}])
def test_counts_below_one_are_refused(kw):
    with pytest.raises(ValueError):
        HealthState(**kw)
