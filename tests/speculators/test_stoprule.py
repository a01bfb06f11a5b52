"""The stop rule a plan hands a model drafter: a value, deciding from confidences."""

import random

import pytest

from atlas_sidecar.engine.stoprule import Calibration, StopRule

EDGES = (0.5, 0.9, 1.0)


def brute_best(probs, verify_s, draft_s):
    """Every prefix length's expected tokens per second, the best one (earliest on ties)."""
    rates = []
    for n in range(len(probs) + 1):
        gained, reach = 1.0, 1.0
        for p in probs[:n]:
            reach *= p
            gained += reach
        rates.append(gained / (verify_s[n] + draft_s * n))
    best = max(range(len(rates)), key=lambda n: (rates[n], -n))
    return best, rates[best]


@pytest.mark.parametrize("seed", range(20))
def test_best_length_is_the_best_prefix(seed):
    rng = random.Random(seed)
    cap = rng.randint(1, 12)
    verify_s = tuple(sorted(rng.uniform(0.05, 0.2) for _ in range(cap + 1)))
    rule = StopRule(Calibration(EDGES, None), cap, verify_s, rng.uniform(0, 0.02))
    probs = [rng.random() for _ in range(cap)]
    n, rate = rule.best_length(probs)
    want_n, want_rate = brute_best(probs, verify_s, rule.draft_s)
    assert n == want_n and rate == pytest.approx(want_rate)


def test_a_confident_run_drafts_on_and_an_unsure_token_stops_it():
    verify_s = tuple(0.1 + 0.002 * n for n in range(9))
    rule = StopRule(Calibration(EDGES, (0.2, 0.6, 0.95)), 8, verify_s, 0.01)
    assert rule.keep_going([0.95, 0.97])
    assert not rule.keep_going([0.95, 0.3])
    assert not rule.keep_going([0.95] * 8)  # the cap


def test_calibration_by_bin():
    calibrated = Calibration(EDGES, (0.1, 0.5, 0.9))
    assert [calibrated(c) for c in (0.2, 0.7, 0.95)] == [0.1, 0.5, 0.9]
    assert Calibration(EDGES, None)(1.0) == 0.99  # a draft is never certain
