"""When a model drafter stops drafting: a rule the controller's plan hands the drafter.

A drafter that pays per token drafts one token at a time and asks the rule, with the
confidences so far, whether to draft on. The rule is a value, fixed when the step is
planned (the calibration of confidences into acceptance probabilities and the verify
costs of every length it may reach); it calls nothing back and changes nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """P(a drafted token is accepted) from the drafter's confidence in it: learned
    per confidence bin (``bins``, upper edges ``edges``), or the confidence itself when
    ``bins`` is None (capped at 0.99: a draft is never certain)."""

    edges: tuple[float, ...]
    bins: tuple[float, ...] | None

    def __call__(self, confidence: float) -> float:
        if self.bins is None:
            return min(max(confidence, 0.0), 0.99)
        index = min(bisect.bisect_right(self.edges, confidence), len(self.edges) - 1)
        return self.bins[index]


@dataclass(frozen=True)
class StopRule:
    """Draft on while drafting on, to any length up to ``cap``, still beats stopping now.

    Each token to come is costed at the last one's calibrated odds: a draft model's
    confidence comes in stretches (boilerplate, an identifier being spelled out, a
    sentence's open end), so the last token is the best guess at the next. Not only
    the next token is weighed: a forward's cost rises in steps (one token more may cost
    a step, several more hardly anything), so one more can lose where a few win.

    ``verify_s[n]``: this sequence's share of the verify forward with n drafted tokens
    (n + 1 fed), for n in 0..cap; ``draft_s``: seconds per drafted token.
    """

    calibration: Calibration
    cap: int
    verify_s: tuple[float, ...]
    draft_s: float

    def keep_going(self, confidences: Sequence[float]) -> bool:
        n = len(confidences)
        if n >= self.cap:
            return False
        if n == 0:
            return True
        probs = [self.calibration(c) for c in confidences]
        _, now = self.best_length(probs)
        ahead_n, ahead = self.best_length(probs + [probs[-1]] * (self.cap - n))
        return ahead_n > n and ahead >= now

    def best_length(self, probs: Sequence[float]) -> tuple[int, float]:
        """The chain length (0..len(probs)) with the most expected tokens per second,
        and that rate. A chain's reach only falls along it, so its best cuts are
        prefixes."""
        best_n, best = 0, 1.0 / self.verify_s[0]
        reach, gained = 1.0, 1.0
        for n, p in enumerate(probs, start=1):
            reach *= p
            gained += reach
            rate = gained / (self.verify_s[n] + self.draft_s * n)
            if rate > best:
                best_n, best = n, rate
        return best_n, best
