"""The recovery figure: requests after a domain shift until accept_len is back at the
new phase's level (within 10% of, or above, its mean over the later requests)."""

from __future__ import annotations

from atlas_sidecar.tooling.bench import phase_segments, recovery


def _shifts(values: list[float], phases: list[str]) -> list[int | None]:
    return [r["requests"] for r in recovery(values, phases)]


def test_a_dip_after_the_shift_counts_the_requests_until_recovery():
    phases = ["python"] * 2 + ["rust"] * 5
    # 1.0 and 1.5 are far under the later level (3.0); the third rust request is at it.
    values = [3.0, 3.0, 1.0, 1.5, 3.0, 3.1, 2.9]
    (shift,) = recovery(values, phases)
    assert shift == {
        "from": "python", "to": "rust", "shift_at": 2, "phase_requests": 5, "requests": 2,
    }  # fmt: skip


def test_never_recovering_is_null():
    phases = ["python"] * 2 + ["chat"] * 4
    values = [3.0, 3.0, 1.0, 1.0, 1.0, 3.0]  # only the last request gets there
    assert _shifts(values, phases) == [None]


def test_negative_control_no_dip_means_zero():
    """A mode that does not suffer from the shift (flat, or already above its later
    level) recovers at once: no spurious recovery time."""
    phases = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert _shifts([1.0] * 9, phases) == [0, 0]
    assert _shifts([5.0, 5.0, 5.0, 4.0, 3.0, 2.0, 2.0, 1.5, 1.0], phases) == [0, 0]


def test_within_ten_percent_counts_as_recovered():
    phases = ["a", "b", "b"]
    assert _shifts([3.0, 2.75, 3.0], phases) == [0]  # 0.92 of the later mean
    assert _shifts([3.0, 2.6, 3.0], phases) == [None]  # 0.87: not yet, and no request left


def test_a_one_request_phase_has_no_later_level():
    assert _shifts([2.0, 2.0, 1.0, 2.0, 2.0], ["a", "a", "b", "c", "c"]) == [None, 0]


def test_a_phase_that_comes_back_is_a_new_shift():
    phases = ["python", "python", "chat", "chat", "python", "python"]
    assert phase_segments(phases) == [(0, 2, "python"), (2, 4, "chat"), (4, 6, "python")]
    shifts = recovery([4.0, 4.0, 1.1, 1.0, 1.0, 4.0], phases)
    assert [(s["from"], s["to"], s["shift_at"], s["requests"]) for s in shifts] == [
        ("python", "chat", 2, 0),
        ("chat", "python", 4, None),
    ]
