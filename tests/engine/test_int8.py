"""Weight-only int8 draft models: close to the originals, and the output stays exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from atlas_sidecar.engine.backends.int8 import (
    INT8_MAX_ROWS,
    Int8Linear,
    int8_supported,
    quantize_int8,
)
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.tooling.workloads import encode

from .conftest import AGREEING_LAYERS, SMOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_close_to_the_linear_it_replaces(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias).to(dtype)
    x = torch.randn(2, INT8_MAX_ROWS // 2, 64, dtype=dtype)  # few rows: the int8 kernel
    expected = linear(x).float()
    got = Int8Linear(linear)(x)
    assert got.shape == (2, INT8_MAX_ROWS // 2, 48) and got.dtype == dtype
    error = (got.float() - expected).norm() / expected.norm()
    assert 0 < error < (0.02 if dtype == torch.float32 else 0.04)
    # A negative control: a different layer's weights are far off.
    other = Int8Linear(nn.Linear(64, 48, bias=bias).to(dtype))(x).float()
    assert (other - expected).norm() / expected.norm() > 0.5
    # Many rows (a prefill): the native weights, where they are the faster.
    many = torch.randn(3, INT8_MAX_ROWS, 64, dtype=dtype)
    assert torch.equal(Int8Linear(linear)(many), linear(many))


def test_quantize_replaces_every_linear_and_keeps_embeddings():
    runner = CausalLMRunner.load(SMOL, dtype="fp32", num_layers=2)
    linears = sum(isinstance(m, nn.Linear) for m in runner.model.modules())
    assert quantize_int8(runner.model) == linears > 0
    assert not any(isinstance(m, nn.Linear) for m in runner.model.modules())
    assert isinstance(runner.model.get_input_embeddings(), nn.Embedding)


def test_load_picks_int8_on_cpu_for_auto_and_refuses_unknown_formats():
    runner = CausalLMRunner.load(SMOL, dtype="fp32", num_layers=1, weights="auto")
    assert isinstance(runner.model.get_output_embeddings(), Int8Linear)
    native = CausalLMRunner.load(SMOL, dtype="fp32", num_layers=1, weights="native")
    assert isinstance(native.model.get_output_embeddings(), nn.Linear)
    with pytest.raises(ValueError, match="unknown weights"):
        CausalLMRunner.load(SMOL, dtype="fp32", num_layers=1, weights="int4")
    assert int8_supported("cpu") and not int8_supported("cuda:0")


def test_an_int8_drafter_keeps_greedy_output_exact(target, layer_skip, real_prompts):
    int8 = CausalLMRunner.load(SMOL, dtype="fp32", num_layers=AGREEING_LAYERS, weights="int8")
    plain = Engine(target, target.tokenizer)
    native = layer_skip(AGREEING_LAYERS)
    engines = {
        name: Engine(target, target.tokenizer, StaticSpeculator(draft), 4)
        for name, draft in (("int8", int8), ("native", native))
    }
    accepted = dict.fromkeys(engines, 0)
    for prompt in real_prompts[:3] + real_prompts[-3:]:
        ids = encode(target.tokenizer, prompt)
        params = SamplingParams(max_tokens=24)
        expected = plain.generate(ids, params).token_ids
        for name, engine in engines.items():
            got = engine.generate(ids, params)
            assert got.token_ids == expected, (name, prompt.prompt_id)
            accepted[name] += got.accepted
    # Still as useful a drafter after quantization (within noise of the original).
    assert accepted["int8"] > 0.8 * accepted["native"] > 0
    assert int8.live_sequences == 0
