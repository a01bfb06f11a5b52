"""The embedded default backend: a Hugging Face causal LM in-process with its KV cache.

Also runs draft models (the static speculator), which need exactly the same operations.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from atlas_sidecar import models

DEFAULT_MAX_SEQUENCES = 256


def default_dtype(device: str) -> torch.dtype:
    """bf16 where it is supported (CPU, recent GPUs), else fp16."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "", "auto"):
        return default_dtype(device)
    table = {
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16,
        "fp32": torch.float32, "float32": torch.float32,
        "fp64": torch.float64, "float64": torch.float64,
    }  # fmt: skip
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def truncate_layers(model: Any, num_layers: int) -> Any:
    """Keep the first ``num_layers`` decoder layers: a cheap self-speculative drafter."""
    layers = model.model.layers
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


class CausalLMRunner:
    """A Hugging Face causal LM with one DynamicCache per live sequence."""

    def __init__(
        self, model: Any, tokenizer: Any, max_sequences: int = DEFAULT_MAX_SEQUENCES
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 32768)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.max_sequences = max_sequences
        self._caches: dict[str, DynamicCache] = {}

    @classmethod
    def load(
        cls,
        ref: str,
        dtype: str | None = None,
        device: str = "cpu",
        num_layers: int | None = None,
    ) -> CausalLMRunner:
        model, tokenizer = models.load(ref, dtype=parse_dtype(dtype, device), device=device)
        if num_layers is not None:
            truncate_layers(model, num_layers)
        return cls(model, tokenizer)

    def start(self, seq_id: str) -> None:
        if seq_id in self._caches:
            raise ValueError(f"sequence {seq_id} already started")
        if len(self._caches) >= self.max_sequences:
            raise RuntimeError(f"too many live sequences (max {self.max_sequences})")
        self._caches[seq_id] = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, seq_id: str, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` to the sequence's cache; return their logits [len, V] in fp32."""
        cache = self._caches[seq_id]
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    def truncate(self, seq_id: str, length: int) -> None:
        cache = self._caches[seq_id]
        excess = cache.get_seq_length() - length
        if excess > 0:
            cache.crop(-excess)  # transformers 5 crops by a negative count of tokens

    def cached_len(self, seq_id: str) -> int:
        return int(self._caches[seq_id].get_seq_length())

    def release(self, seq_id: str) -> None:
        self._caches.pop(seq_id, None)

    @property
    def live_sequences(self) -> int:
        return len(self._caches)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
