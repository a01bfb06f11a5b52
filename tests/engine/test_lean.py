"""The lean draft forward (``lean.py``) against Hugging Face's, on the real draft model."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.tooling.workloads import encode

pytestmark = pytest.mark.skipif(
    not models.is_pulled(models.DEFAULT_DRAFT),
    reason="Qwen draft not pulled: run `atlas models pull` (make test does)",
)

LAYERS = 6  # the draft's first layers: the same code path, a quarter of the time


def _pair(weights: str) -> tuple[CausalLMRunner, CausalLMRunner]:
    """Two copies of the draft: Hugging Face's forward, and the lean one."""
    runners = [
        CausalLMRunner.load(models.DEFAULT_DRAFT, dtype="fp32", num_layers=LAYERS, weights=weights)
        for _ in range(2)
    ]
    assert runners[1].use_lean_decoder()
    return runners[0], runners[1]


def _both(pair, items, **kwargs):
    """Each item through Hugging Face's forward on its own, and all in one lean forward."""
    reference, lean = pair
    return [reference.forward_many([item], **kwargs)[0] for item in items], lean.forward_many(
        items, **kwargs
    )


def _assert_same(reference: list[torch.Tensor], lean: list[torch.Tensor]) -> None:
    assert len(reference) == len(lean)
    for want, got in zip(reference, lean, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("weights", ["native", "int8"])
def test_lean_forward_matches_hugging_face(real_prompts, weights):
    pair = _pair(weights)
    tokenizer = pair[0].tokenizer
    prompts = [encode(tokenizer, p)[:length] for p, length in zip(
        real_prompts[:3], (40, 57, 23), strict=True)]  # fmt: skip
    for runner in pair:
        for i, ids in enumerate(prompts):
            runner.start(f"s{i}")
            runner.forward(f"s{i}", ids, last_only=True)  # a prefill: Hugging Face's for both
    # One sequence: a draft step, a short catch-up, the longest lean chain.
    for chunk in ([11], [12, 13, 14], list(range(300, 316))):
        _assert_same(*_both(pair, [ForwardItem("s0", chunk)]))
    # Sequences of different cache lengths and widths in one forward. Int8 weights run
    # int8's few-row kernel up to 4 rows in a forward, the native weights above: widths
    # for which the lean forward's rows (all sequences') and each reference's pick the same.
    for widths in ((1, 1, 1), (1, 2, 1), (5, 6, 5)):
        items = [ForwardItem(f"s{i}", [500 + i] * w) for i, w in enumerate(widths)]
        _assert_same(*_both(pair, items))
        items = [ForwardItem(f"s{i}", [600 + i] * w) for i, w in enumerate(widths)]
        _assert_same(*_both(pair, items, last_only=True))
    assert [r.cached_len("s1") for r in pair] == [57 + 2 * (1 + 2 + 6)] * 2


def test_lean_and_hugging_face_forwards_share_a_cache(real_prompts):
    """A tree forward (Hugging Face's, on the fused weights) and ``keep`` between lean
    steps: the caches stay the same as the reference's."""
    pair = _pair("int8")
    ids = encode(pair[0].tokenizer, real_prompts[4])[:30]
    for runner in pair:
        runner.start("a")
        runner.forward("a", ids, last_only=True)
    _assert_same(*_both(pair, [ForwardItem("a", [7, 8])]))
    tree = ForwardItem("a", [20, 21, 22, 23], parents=[-1, 0, -1, 2])
    _assert_same(*_both(pair, [tree]))
    for runner in pair:
        runner.keep("a", 32, [2, 3])
        assert runner.cached_len("a") == 34
    for chunk in ([24], [25, 26]):
        _assert_same(*_both(pair, [ForwardItem("a", chunk)]))
    for runner in pair:
        runner.truncate("a", 33)
    _assert_same(*_both(pair, [ForwardItem("a", [27])]))


def test_models_without_a_lean_forward_keep_hugging_faces(target):
    """SmolLM2 (Llama) has none: the runner says so and its forwards are unchanged."""
    assert not target.use_lean_decoder()
