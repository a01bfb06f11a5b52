"""The embedded default backend: a Hugging Face causal LM in-process with its KV cache.

Also runs draft models (the static speculator), which need exactly the same operations.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from atlas_sidecar import models
from atlas_sidecar.engine.backends import lean
from atlas_sidecar.engine.backends.attention import use_grouped_attention
from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.int8 import WEIGHT_FORMATS, int8_supported, quantize_int8
from atlas_sidecar.engine.capabilities import TargetCapabilities
from atlas_sidecar.engine.tree import ancestry, depths

DEFAULT_MAX_SEQUENCES = 256
# An LM head: final hidden states [..., hidden] -> logits [..., vocab].
Head = Callable[[torch.Tensor], torch.Tensor]


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
    """A Hugging Face causal LM with one DynamicCache per live sequence.

    ``forward_many`` runs several sequences (each with its own cache length and its
    own number of new tokens, chains or trees) in one batched forward: their caches
    are padded side by side and a 4D attention mask keeps every row to its own
    tokens. With ``record_hidden``, the final hidden state of every cached token is
    kept too (what a neural drafter learns from).
    """

    capabilities = TargetCapabilities()  # in-process: trees, full logits, hidden states

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
        record_hidden: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 32768)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.max_sequences = max_sequences
        self.record_hidden = record_hidden
        self._caches: dict[str, DynamicCache] = {}
        self._hidden: dict[str, torch.Tensor] = {}
        self._cache_argument = _cache_argument(model.get_decoder())
        self._lean: lean.LeanDecoder | None = None
        if self.device.type == "cpu":
            use_grouped_attention(model)

    @classmethod
    def load(
        cls,
        ref: str,
        dtype: str | None = None,
        device: str = "cpu",
        num_layers: int | None = None,
        record_hidden: bool = False,
        weights: str = "native",
    ) -> CausalLMRunner:
        """``weights="int8"``: weight-only int8 linear layers, for draft models only
        (``int8.py``); ``"auto"``: int8 where supported (CPU), else native."""
        if weights not in ("auto", *WEIGHT_FORMATS):
            raise ValueError(f"unknown weights {weights!r}; use auto, {', '.join(WEIGHT_FORMATS)}")
        model, tokenizer = models.load(ref, dtype=parse_dtype(dtype, device), device=device)
        if num_layers is not None:
            truncate_layers(model, num_layers)
        runner = cls(model, tokenizer, record_hidden=record_hidden)
        if weights == "int8" or (weights == "auto" and int8_supported(device)):
            quantize_int8(model)
        return runner

    def use_lean_decoder(self) -> bool:
        """Run chains of few tokens through ``lean.py``'s forward from now on, where the
        model has one (on the CPU); returns whether it does. For draft models only: a
        target keeps Hugging Face's forward, the reference every mode verifies with."""
        if self._lean is None and self.device.type == "cpu" and lean.supports(self.model):
            self._lean = lean.LeanDecoder(self.model)
        return self._lean is not None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def start(self, seq_id: str) -> None:
        if seq_id in self._caches:
            raise ValueError(f"sequence {seq_id} already started")
        if len(self._caches) >= self.max_sequences:
            raise RuntimeError(f"too many live sequences (max {self.max_sequences})")
        self._caches[seq_id] = DynamicCache(config=self.model.config)
        if self.record_hidden:
            self._hidden[seq_id] = torch.empty(0, self.hidden_size, dtype=self.dtype)

    def forward(
        self, seq_id: str, tokens: list[int], head: Head | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Append ``tokens`` to the sequence's cache; return their logits [len, V] in fp32."""
        return self.forward_many([ForwardItem(seq_id, tokens)], head, last_only)[0]

    @torch.inference_mode()
    def forward_many(
        self, items: list[ForwardItem], head: Head | None = None, last_only: bool = False
    ) -> list[torch.Tensor]:
        """Append each item's tokens to its sequence's cache in one batched forward.

        Returns each item's logits [len(tokens), V] in fp32 (row i predicts the token
        after tokens[i]); with ``last_only``, [1, V] after its last token (a drafter's
        catch-up need not pay the LM head for every token it feeds). ``head`` replaces
        the model's LM head (a draft vocabulary). A tree item's cache then holds every
        node: ``keep`` chooses the accepted path.
        """
        if head is None:
            head = self.model.get_output_embeddings()
        if not items:
            return []
        if any(not item.tokens for item in items):
            raise ValueError("every item needs at least one token")
        if len({item.seq_id for item in items}) != len(items):
            raise ValueError("a sequence may appear once per forward")
        for item in items:
            if item.parents is not None and len(item.parents) != len(item.tokens):
                raise ValueError(
                    f"{item.seq_id}: {len(item.tokens)} tokens but {len(item.parents)} parents"
                )
        if self._lean is not None and all(
            item.parents is None and len(item.tokens) <= lean.MAX_TOKENS for item in items
        ):
            return self._forward_lean(items, head, last_only)
        if len(items) == 1:
            item = items[0]  # one sequence, chain or tree: its cache as it is, no padding
            cache = self._caches[item.seq_id]
            ids = torch.tensor([item.tokens], dtype=torch.long, device=self.device)
            positions = mask = None
            if item.parents is not None:
                _check_full_attention([cache])
                past, n = cache.get_seq_length(), len(item.tokens)
                positions = (past + torch.tensor([depths(item.parents)])).to(self.device)
                mask = torch.ones(1, 1, n, past + n, dtype=torch.bool)
                mask[0, 0, :, past:] = ancestry(item.parents)
                mask = mask.to(self.device)
            hidden = self._run(ids, cache, positions, mask)[0]
            self._append_hidden(item.seq_id, hidden)
            return [head(hidden[-1:] if last_only else hidden).float()]
        return self._forward_padded(items, head, last_only)

    def _forward_lean(
        self, items: list[ForwardItem], head: Head, last_only: bool
    ) -> list[torch.Tensor]:
        assert self._lean is not None
        caches = [self._caches[item.seq_id] for item in items]
        _check_full_attention(caches)
        hidden = self._lean.run([item.tokens for item in items], caches)
        ends = list(itertools.accumulate(len(item.tokens) for item in items))
        starts = [0, *ends[:-1]]
        for item, start, end in zip(items, starts, ends, strict=True):
            self._append_hidden(item.seq_id, hidden[start:end])
        if last_only:
            logits = head(hidden[[end - 1 for end in ends]]).float()
            return [logits[r : r + 1] for r in range(len(items))]
        logits = head(hidden).float()
        return [logits[start:end] for start, end in zip(starts, ends, strict=True)]

    def _forward_padded(
        self, items: list[ForwardItem], head: Head, last_only: bool
    ) -> list[torch.Tensor]:
        caches = [self._caches[item.seq_id] for item in items]
        _check_full_attention(caches)
        past = [cache.get_seq_length() for cache in caches]
        widths = [len(item.tokens) for item in items]
        pad_past, width = max(past), max(widths)
        rows = len(items)
        ids = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        # mask[r, 0, q, k]: may row r's query q see key k? Keys: [past | pad | new].
        mask = torch.zeros(rows, 1, width, pad_past + width, dtype=torch.bool)
        for r, item in enumerate(items):
            n = widths[r]
            parents = item.parents if item.parents is not None else list(range(-1, n - 1))
            ids[r, :n] = torch.tensor(item.tokens)
            positions[r, :n] = past[r] + torch.tensor(depths(parents))
            positions[r, n:] = past[r] + torch.arange(n, width)
            mask[r, 0, :, : past[r]] = True
            mask[r, 0, :n, pad_past : pad_past + n] = ancestry(parents)
            # Padding queries see themselves only (a row of all-False would give NaNs).
            idx = torch.arange(n, width)
            mask[r, 0, idx, pad_past + idx] = True
        layers = []
        if pad_past:
            for layer_idx in range(len(caches[0].layers)):
                kv = [(_layers(c)[layer_idx].keys, _layers(c)[layer_idx].values) if n else None
                      for c, n in zip(caches, past, strict=True)]  # fmt: skip
                shape = next(pair[0].shape for pair in kv if pair is not None)
                empty = torch.empty(1, shape[1], 0, shape[3], dtype=self.dtype, device=self.device)
                layers.append(tuple(
                    torch.cat([_pad_past(empty if pair is None else pair[i], pad_past)
                               for pair in kv])
                    for i in (0, 1)
                ))  # fmt: skip
        batch_cache = DynamicCache(ddp_cache_data=layers) if pad_past else DynamicCache()
        hidden = self._run(
            ids.to(self.device), batch_cache, positions.to(self.device), mask.to(self.device)
        )
        for r, (item, cache) in enumerate(zip(items, caches, strict=True)):
            n = widths[r]
            for layer_idx, layer in enumerate(_layers(batch_cache)):
                new_k = layer.keys[r : r + 1, :, pad_past : pad_past + n]
                new_v = layer.values[r : r + 1, :, pad_past : pad_past + n]
                _layers(cache)[layer_idx].update(new_k, new_v)
            self._append_hidden(item.seq_id, hidden[r, :n])
        if last_only:
            last = torch.tensor(widths, device=hidden.device) - 1
            logits = head(hidden[torch.arange(rows, device=hidden.device), last]).float()
            return [logits[r : r + 1] for r in range(rows)]
        logits = head(hidden).float()
        return [logits[r, :n] for r, n in enumerate(widths)]

    def _run(
        self,
        ids: torch.Tensor,
        cache: DynamicCache,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One forward through the decoder: the final hidden states [rows, width, hidden]."""
        decoder = self.model.get_decoder()
        out = decoder(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_argument: cache},
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def _append_hidden(self, seq_id: str, hidden: torch.Tensor) -> None:
        if self.record_hidden:
            self._hidden[seq_id] = torch.cat([self._hidden[seq_id], hidden.to("cpu")])

    def truncate(self, seq_id: str, length: int) -> None:
        """Cut the cache (and recorded hidden states) back to ``length`` tokens.

        Layer by layer: a forward cut off part-way (an error in layer i) has grown only
        the layers before i, and rolling it back must bring every layer to ``length``."""
        for layer in _layers(self._caches[seq_id]):
            excess = layer.get_seq_length() - length
            if excess > 0:
                layer.crop(-excess)  # transformers 5 crops by a negative count of tokens
        if self.record_hidden:
            self._hidden[seq_id] = self._hidden[seq_id][:length]

    def keep(self, seq_id: str, prefix: int, path: list[int]) -> None:
        """After a tree forward: keep the first ``prefix`` cached tokens, then the tree
        nodes at indices ``path`` (root to leaf), dropping the other branches."""
        cache = self._caches[seq_id]
        index = torch.cat([torch.arange(prefix), prefix + torch.tensor(path, dtype=torch.long)])
        if len(index) > cache.get_seq_length():
            raise ValueError(f"{seq_id}: path {path} beyond the cache")
        for layer in _layers(cache):
            if layer.is_initialized:
                device_index = index.to(layer.keys.device)
                layer.keys = layer.keys.index_select(-2, device_index)
                layer.values = layer.values.index_select(-2, device_index)
        if self.record_hidden:
            self._hidden[seq_id] = self._hidden[seq_id].index_select(0, index)

    def hidden(self, seq_id: str) -> torch.Tensor:
        """[cached_len, hidden_size] final hidden states (on CPU); needs ``record_hidden``."""
        if not self.record_hidden:
            raise RuntimeError("this runner does not record hidden states")
        return self._hidden[seq_id]

    def cached_len(self, seq_id: str) -> int:
        """Tokens every layer holds (after a forward cut off part-way, the fewest)."""
        return min((int(layer.get_seq_length()) for layer in _layers(self._caches[seq_id])),
                   default=0)  # fmt: skip

    def release(self, seq_id: str) -> None:
        self._caches.pop(seq_id, None)
        self._hidden.pop(seq_id, None)

    @property
    def live_sequences(self) -> int:
        return len(self._caches)


def _cache_argument(decoder: Any) -> str:
    """The decoder's name for its KV cache: ``cache`` from transformers 5.24 on
    (``past_key_values``, deprecated there, is removed in 5.40)."""
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _check_full_attention(caches: list[DynamicCache]) -> None:
    for cache in caches:
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError("batched and tree forwards need full-attention layers")


def _layers(cache: DynamicCache) -> list[Any]:
    """A cache's layers; ``forward_many`` checked they are full-attention DynamicLayers."""
    return list(cache.layers)


def _pad_past(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Cached keys or values [1, heads, length, dim], zero-padded to ``width`` positions."""
    if tensor.shape[2] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, 0, width - tensor.shape[2]))


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
