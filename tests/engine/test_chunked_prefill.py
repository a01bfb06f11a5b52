"""Chunked prefill: a prompt fed in chunks gives the whole prefill's greedy output."""

from __future__ import annotations

import pytest

from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.tooling.workloads import encode


@pytest.mark.parametrize("chunk", [7, 64])
def test_a_prompt_prefilled_in_chunks_gives_the_whole_prefills_greedy_output(
    target, real_prompts, chunk
):
    ids = encode(target.tokenizer, real_prompts[0])
    assert len(ids) > 2 * chunk
    params = SamplingParams(max_tokens=16)
    engine = Engine(target, target.tokenizer)
    expected = engine.generate(ids, params).token_ids
    seq = engine.begin(ids, params)
    try:
        fed = []
        while seq.prefilling:
            assert seq.output == []  # the first token comes with the prompt's last chunk
            fed.append(engine.prefill(seq, chunk))
        assert fed[:-1] == [chunk] * (len(fed) - 1) and sum(fed) == len(ids)
        assert target.cached_len(seq.seq_id) == len(ids)
        with pytest.raises(ValueError, match="already prefilled"):
            engine.prefill(seq, chunk)
        while not seq.finished:
            engine.step(seq)
        assert seq.output == expected
    finally:
        engine.release(seq)
    assert target.live_sequences == 0


def test_a_sequence_still_prefilling_cannot_step(target):
    engine = Engine(target, target.tokenizer)
    seq = engine.begin([1, 2, 3, 4], SamplingParams(max_tokens=4))
    try:
        engine.prefill(seq, 2)
        with pytest.raises(ValueError, match="prefilled"):
            engine.step_many([seq])
    finally:
        engine.release(seq)
