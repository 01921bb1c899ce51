import itertools
import random

import pytest

from iwsproxy.backoff import backoff, eject_duration


def take(n, iterator):
    return list(itertools.islice(iterator, n))


def caps(n, *, initial_s=0.05, factor=2.0, max_s=5.0):
    """The caps after the leading 0.0, computed here independently of the module."""
    out, cap = [], min(max_s, initial_s)
    for _ in range(n):
        out.append(cap)
        cap = min(max_s, cap * factor)
    return out


# -- backoff ---------------------------------------------------------------------


def test_first_delay_is_zero():
    assert next(backoff(rng=random.Random(0))) == 0.0


def test_without_jitter_the_delays_are_the_caps():
    delays = take(10, backoff(initial_s=0.05, factor=2.0, max_s=1.0, jitter=0.0))
    assert delays == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_bounds_over_many_draws(seed, jitter):
    n = 2000
    delays = take(n + 1, backoff(jitter=jitter, rng=random.Random(seed)))
    assert delays[0] == 0.0
    expected_caps = caps(n)
    assert expected_caps == sorted(expected_caps)  # monotone non-decreasing caps
    for delay, cap in zip(delays[1:], expected_caps):
        assert cap * (1 - jitter) <= delay <= cap <= 5.0


def test_jitter_spans_its_range():
    delays = take(5000, backoff(initial_s=5.0, max_s=5.0, jitter=0.5, rng=random.Random(1)))
    ratios = [delay / 5.0 for delay in delays[1:]]
    assert 0.5 <= min(ratios) < 0.52
    assert 0.98 < max(ratios) <= 1.0


def test_seeded_rng_repeats():
    assert take(50, backoff(rng=random.Random(7))) == take(50, backoff(rng=random.Random(7)))


def test_stays_at_the_cap_forever():
    # the raw exponential would overflow a float long before the last draw
    delays = take(5000, backoff(initial_s=1e-300, factor=10.0, max_s=3.0, jitter=0.0))
    assert delays[-1] == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_s": 0}, {"factor": 0.5}, {"max_s": -1}, {"jitter": -0.1}, {"jitter": 1.5}],
)
def test_backoff_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        next(backoff(**kwargs))


# -- eject_duration ---------------------------------------------------------------


@pytest.mark.parametrize("ejections, nominal", [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0)])
def test_eject_duration_doubles_within_ten_percent(ejections, nominal):
    rng = random.Random(3)
    for _ in range(500):
        d = eject_duration(ejections, base_s=1.0, max_s=60.0, rng=rng)
        assert nominal * 0.9 <= d <= nominal * 1.1


@pytest.mark.parametrize("ejections", [7, 8, 100, 10_000])
def test_eject_duration_never_exceeds_max(ejections):
    rng = random.Random(4)
    draws = [eject_duration(ejections, base_s=1.0, max_s=60.0, rng=rng) for _ in range(500)]
    assert all(54.0 <= d <= 60.0 for d in draws)
    assert max(draws) == 60.0  # the upper jitter is clipped to the cap


def test_eject_duration_jitter_is_plus_minus_ten_percent():
    rng = random.Random(5)
    draws = [eject_duration(1, base_s=10.0, max_s=100.0, rng=rng) for _ in range(5000)]
    assert 9.0 <= min(draws) < 9.05
    assert 10.95 < max(draws) <= 11.0


def test_eject_duration_counts_from_one():
    with pytest.raises(ValueError):
        eject_duration(0, base_s=1.0, max_s=60.0)
