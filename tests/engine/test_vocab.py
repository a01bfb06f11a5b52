"""Draft vocabularies: a draft model's LM head over the tokens traffic uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.int8 import Int8Linear
from atlas_sidecar.engine.backends.vocab import DraftVocabulary
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.static import StaticSpeculator

from .conftest import AGREEING_LAYERS


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_logits_are_the_heads_own_on_the_vocabulary_and_minus_inf_elsewhere(int8, bias):
    torch.manual_seed(0)
    linear = nn.Linear(32, 100, bias=bias)
    head = Int8Linear(linear) if int8 else linear
    vocab = DraftVocabulary(head, 100, always=[99], base=10, capacity=20)
    assert vocab.size == 11 and 99 in vocab and 10 not in vocab
    hidden = torch.randn(1, 3, 32)  # few rows: the int8 head's int8 kernel too
    full, got = head(hidden), vocab(hidden)
    assert got.shape == (1, 3, 100)
    inside = [*range(10), 99]
    assert torch.allclose(got[..., inside], full[..., inside], atol=1e-5)
    outside = [t for t in range(100) if t not in inside]
    assert torch.isinf(got[..., outside]).all() and (got[..., outside] < 0).all()


def test_learning_adds_new_tokens_once_and_stops_at_capacity():
    head = nn.Linear(8, 100)
    vocab = DraftVocabulary(head, 100, base=10, capacity=15)
    assert vocab.learn([3, 50, 50, 51, 200, -1]) == 2  # 3 known, 200 and -1 not tokens
    assert 50 in vocab and 51 in vocab and vocab.size == 12
    assert vocab.learn(range(60, 70)) == 3  # room for 3 more
    assert vocab.size == 15 and 62 in vocab and 63 not in vocab
    assert vocab.learn([80]) == 0
    # A learned token's logit is its own row's, wherever it landed in the buffers.
    hidden = torch.randn(1, 8)
    assert torch.allclose(vocab(hidden)[0, 50], head(hidden)[0, 50], atol=1e-6)


def test_a_drafter_last_only_forward_gives_the_last_rows_logits(target):
    ids = target.tokenizer.encode("def fib(n):\n    return")
    for name in ("all", "last"):
        target.start(name)
    try:
        everything = target.forward_many([ForwardItem("all", ids)])[0]
        last = target.forward_many([ForwardItem("last", ids)], last_only=True)[0]
        assert last.shape == (1, everything.shape[1])
        assert torch.allclose(last[0], everything[-1], atol=1e-4)
        batched = target.forward_many([ForwardItem("all", [5, 6]), ForwardItem("last", [5])],
                                      last_only=True)  # fmt: skip
        assert [tuple(b.shape) for b in batched] == [(1, everything.shape[1])] * 2
    finally:
        for name in ("all", "last"):
            target.release(name)


def test_the_static_drafter_learns_its_contexts_tokens_and_can_draft_them(layer_skip):
    draft = layer_skip(AGREEING_LAYERS)
    speculator = StaticSpeculator(draft)
    vocab = speculator.vocabulary
    assert vocab is not None and vocab.size < draft.vocab_size
    rare = draft.vocab_size - 5  # an id far above the base set
    assert rare not in vocab
    context = draft.tokenizer.encode("The answer is") + [rare, rare, rare]
    request = DraftRequest("v", context, 3, SamplingParams())
    (drafted,) = speculator.propose([request])
    assert rare in vocab and len(drafted.tokens) == 3
    assert all(token in vocab for token in drafted.tokens)
    speculator.release("v")
    assert draft.live_sequences == 0
