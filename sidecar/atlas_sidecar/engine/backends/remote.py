"""What the backends for an out-of-process target (SGLang, Triton) share: the target's
description read from its config files, and the per-sequence bookkeeping.

The server keeps the KV cache; the sidecar keeps only each sequence's token list (what
the server has seen of it) and the sequences whose last call went unanswered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A fixed text the sidecar's tokenizer and the server's must split the same way.
TOKENIZER_PROBE = "def quicksort(xs):\n    return sorted(xs)  # Grüße, 世界! 12345\n"


@dataclass(frozen=True)
class TargetSpec:
    """What the sidecar knows of the target without its weights: from ``--target``."""

    tokenizer: Any
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    name: str = ""  # the model folder's name (what a published version's identity names)
    hidden_size: int = 0


def target_spec(ref: str) -> TargetSpec:
    """The target's tokenizer, vocabulary size, context and EOS ids, from its config
    files only (no weights are loaded: the server holds the model)."""
    import os

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from atlas_sidecar import models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    location, gguf_file = models.resolve(ref)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    config = AutoConfig.from_pretrained(location, **kwargs)
    text = config.get_text_config()
    eos: set[int] = set()
    sources: list[Any] = [config, tokenizer]
    try:
        sources.insert(0, GenerationConfig.from_pretrained(location, **kwargs))
    except OSError:
        pass  # no generation_config.json: the config's and tokenizer's EOS
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list | tuple):
            eos.update(int(v) for v in value)
    return TargetSpec(
        tokenizer=tokenizer,
        vocab_size=int(getattr(text, "vocab_size", 0) or len(tokenizer)),
        max_context=int(getattr(text, "max_position_embeddings", 0) or 32768),
        eos_token_ids=frozenset(eos),
        name=Path(str(getattr(config, "_name_or_path", "") or location)).name,
        hidden_size=int(getattr(text, "hidden_size", 0) or 0),
    )


class RemoteSequences:
    """The TargetBackend calls that touch no server: each sequence is its token list.
    ``verifies_trees`` is False for these backends, so ``keep`` is never called."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self._tokens: dict[str, list[int]] = {}
        self._poisoned: set[str] = set()  # their last call went unanswered: fail fast

    def start(self, seq_id: str) -> None:
        if seq_id in self._tokens:
            raise ValueError(f"sequence {seq_id} already started")
        self._tokens[seq_id] = []

    def truncate(self, seq_id: str, length: int) -> None:
        tokens = self._tokens[seq_id]
        if not 0 <= length <= len(tokens):
            raise ValueError(f"cannot truncate {seq_id} of {len(tokens)} tokens to {length}")
        del tokens[length:]

    def keep(self, seq_id: str, prefix: int, path: list[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} verifies chains only")

    def cached_len(self, seq_id: str) -> int:
        return len(self._tokens[seq_id])

    def release(self, seq_id: str) -> None:
        self._tokens.pop(seq_id, None)
        self._poisoned.discard(seq_id)

    @property
    def live_sequences(self) -> int:
        return len(self._tokens)
