"""The neural speculator: an EAGLE-style head on the target's own final hidden states.

The target's final hidden state f_i (what its LM head sees at token i) already holds
most of what the next tokens depend on. A small head learns one step of the target:

    f_{i+1} ~= head(f_i, embed(token_{i+1}))

and drafts autoregressively by feeding its own predicted features back in. Tokens come
from the target's own LM head restricted to a draft vocabulary (the most frequent
tokens seen, as in FR-Spec and SGLang's ``--speculative-token-map``): the full
vocabulary would cost more than the head itself. The input embedding and the LM head
rows are the target's, frozen; only the head is trained (``neural_train``).

The engine's invariant gives the features: when a sequence is drafted for, the target's
cache covers ``context[:-1]``, so the last recorded hidden state is that of
``context[-2]`` and ``context[-1]`` is the pending token. The target must record hidden
states (``CausalLMRunner(..., record_hidden=True)``).

Weights are swapped whole (``HeadWeights``, with a version): a draft is computed from
one snapshot, never from weights half-way through a training step.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.capabilities import NEURAL
from atlas_sidecar.engine.sampling import probs_from_logits
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.tree import DraftTree
from atlas_sidecar.models import atlas_home

DEFAULT_DRAFT_VOCAB = 16_384
FORMAT = "atlas-neural-head/1"
MAX_LIVE_SEQUENCES = 4096
_HASH_ROWS = 256  # LM head rows hashed to identify the target: fast and discriminating


class WeightsError(RuntimeError):
    """A weights file is missing, corrupt, truncated, or made for another target."""


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    draft_vocab_size: int = DEFAULT_DRAFT_VOCAB

    @classmethod
    def for_target(cls, target: CausalLMRunner, draft_vocab_size: int = DEFAULT_DRAFT_VOCAB):
        hidden = target.hidden_size
        return cls(hidden, 2 * hidden, min(draft_vocab_size, target.vocab_size))


class DraftHead(nn.Module):
    """One fused input projection and one gated MLP block: (f_i, e_{i+1}) -> f_{i+1}.

    No attention: f_i already summarises the context, and without a cache of its own the
    head is stateless per sequence (trivially batched, nothing to roll back). The output
    norm puts predictions on the scale of the target's final-norm features.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.feature_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.token_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.fuse = nn.Linear(2 * hidden, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        self.out_norm = nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, feature: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.feature_norm(feature), self.token_norm(token_embedding)], -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        x = x + self.down(nn.functional.silu(gate) * up)
        return self.out_norm(x)


@dataclass(frozen=True)
class TargetIdentity:
    """What a head was trained for: loading it onto another target is refused."""

    name: str
    hidden_size: int
    vocab_size: int
    lm_head_sha256: str  # over a fixed sample of LM head rows

    @classmethod
    def of(cls, target: CausalLMRunner) -> TargetIdentity:
        weight = target.model.get_output_embeddings().weight.detach()
        step = max(1, weight.shape[0] // _HASH_ROWS)
        sample = weight[::step].to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(str(tuple(weight.shape)).encode())
        digest.update(sample.numpy().tobytes())
        name = Path(str(getattr(target.model.config, "_name_or_path", "") or "unknown")).name
        return cls(name, target.hidden_size, target.vocab_size, digest.hexdigest())

    def mismatch(self, other: dict[str, Any]) -> str | None:
        for key in ("hidden_size", "vocab_size", "lm_head_sha256"):
            if other.get(key) != getattr(self, key):
                return (
                    f"made for target {other.get('name')!r} ({key} {other.get(key)!r}), "
                    f"this target is {self.name!r} ({key} {getattr(self, key)!r})"
                )
        return None


@dataclass(frozen=True)
class HeadWeights:
    """One immutable snapshot of everything a draft reads: swapped whole, never edited."""

    version: int
    config: HeadConfig
    head: DraftHead  # in the serving dtype, no grad
    vocab: torch.Tensor  # [draft_vocab] target token ids, most frequent first
    rows: torch.Tensor  # [draft_vocab, hidden] the target's LM head rows for ``vocab``
    bias: torch.Tensor | None  # the LM head's bias for ``vocab``, if it has one
    meta: dict[str, Any] = field(default_factory=dict)  # training counters, provenance

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[n, hidden] features -> [n, draft_vocab] float32 logits."""
        out = nn.functional.linear(features, self.rows, self.bias)
        return out.float()


@dataclass
class FinishedSequence:
    """Training material from one finished request: its tokens and the target's features.

    ``features[i]`` is the target's final hidden state at ``tokens[i]``; there is one more
    token than features (the last token's feature was never computed or is not needed).
    """

    tokens: list[int]
    features: torch.Tensor  # [len(tokens) - 1, hidden], on CPU

    def __len__(self) -> int:
        return int(self.features.shape[0])


class Learner(Protocol):
    """Receives finished sequences; must return at once (training happens elsewhere)."""

    def submit(self, sequence: FinishedSequence) -> None: ...


def default_vocab(vocab_size: int, draft_vocab_size: int, eos_ids: frozenset[int]) -> torch.Tensor:
    """Before any traffic: the lowest ids (byte-level BPE merges come roughly in order of
    frequency), plus the end-of-sequence tokens."""
    eos = sorted(t for t in eos_ids if t < vocab_size)
    rest = [t for t in range(vocab_size) if t not in eos_ids][: max(draft_vocab_size - len(eos), 0)]
    return torch.tensor(eos + rest, dtype=torch.long)[:draft_vocab_size]


def default_weights_path(identity: TargetIdentity) -> Path:
    """Where ``atlas`` keeps a target's warm-started head: ``$ATLAS_HOME/drafters/``."""
    return atlas_home() / "drafters" / f"neural-{identity.name}.safetensors"


class NeuralSpeculator:
    name = "neural"
    capabilities = NEURAL

    def __init__(
        self,
        target: CausalLMRunner,
        config: HeadConfig | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if not target.record_hidden:
            raise ValueError("the neural speculator needs a target with record_hidden=True")
        self.target = target
        self.identity = TargetIdentity.of(target)
        self.dtype = dtype or target.dtype
        self.config = config or HeadConfig.for_target(target)
        if self.config.hidden_size != target.hidden_size:
            raise ValueError(
                f"head hidden size {self.config.hidden_size} != target's {target.hidden_size}"
            )
        with torch.random.fork_rng(devices=[]):  # reproducible, and the global RNG untouched
            torch.manual_seed(seed)
            head = DraftHead(self.config)
        self._init_from_target(head)
        vocab = default_vocab(target.vocab_size, self.config.draft_vocab_size, target.eos_token_ids)
        self._weights = self.make_weights(head.state_dict(), vocab, version=0)
        self.learner: Learner | None = None
        self._contexts: dict[str, list[int]] = {}
        self.proposed_calls = 0
        self.drafted_tokens = 0
        self.draft_s = 0.0

    def _init_from_target(self, head: DraftHead) -> None:
        norm = getattr(self.target.model.get_decoder(), "norm", None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape == head.out_norm.weight.shape:
            with torch.no_grad():
                head.out_norm.weight.copy_(weight.float())

    # -- weights -----------------------------------------------------------------------

    @property
    def weights(self) -> HeadWeights:
        return self._weights

    @property
    def version(self) -> int:
        return self._weights.version

    def make_weights(
        self,
        state: dict[str, torch.Tensor],
        vocab: torch.Tensor,
        version: int,
        meta: dict[str, Any] | None = None,
    ) -> HeadWeights:
        """A serving snapshot from a head state dict (any dtype) and a draft vocabulary."""
        vocab = vocab.to(torch.long).cpu()
        if vocab.ndim != 1 or len(vocab) == 0 or len(vocab) != len(torch.unique(vocab)):
            raise WeightsError("the draft vocabulary must be non-empty distinct token ids")
        if int(vocab.min()) < 0 or int(vocab.max()) >= self.target.vocab_size:
            raise WeightsError(f"draft vocabulary ids must be in [0, {self.target.vocab_size})")
        config = HeadConfig(self.config.hidden_size, self.config.intermediate_size, len(vocab))
        head = DraftHead(config)
        head.load_state_dict({k: v.detach().float() for k, v in state.items()})
        head = head.to(device=self.target.device, dtype=self.dtype).eval().requires_grad_(False)
        old = getattr(self, "_weights", None)
        if old is not None and torch.equal(old.vocab, vocab):
            rows, bias = old.rows, old.bias  # unchanged vocabulary: share the frozen rows
        else:
            lm_head = self.target.model.get_output_embeddings()
            index = vocab.to(lm_head.weight.device)
            rows = lm_head.weight.detach().index_select(0, index).to(self.dtype).contiguous()
            bias = None
            if getattr(lm_head, "bias", None) is not None:
                bias = lm_head.bias.detach().index_select(0, index).to(self.dtype)
        return HeadWeights(version, config, head, vocab, rows, bias, dict(meta or {}))

    def swap(self, weights: HeadWeights) -> None:
        """Serve ``weights`` from the next draft on (one reference assignment: atomic)."""
        self._weights = weights

    def save(self, path: str | Path) -> Path:
        """Write the serving weights as safetensors with JSON metadata, atomically."""
        return save_weights(self._weights, self.identity, path)

    def load(self, path: str | Path) -> HeadWeights:
        """Load and serve a weights file; on any error the current weights stay."""
        weights = load_weights(self, path)
        self.swap(weights)
        return weights

    # -- the drafter interface ---------------------------------------------------------

    def observe_context(self, seq_id: str, context: list[int]) -> None:
        """Remember a sequence's tokens so far: what its features are learned against.

        ``propose`` does this itself; a policy that drafts with other speculators on some
        steps calls it so the head learns from every request, not only its own steps."""
        if seq_id not in self._contexts and len(self._contexts) >= MAX_LIVE_SEQUENCES:
            raise RuntimeError(f"too many live sequences (max {MAX_LIVE_SEQUENCES})")
        self._contexts[seq_id] = context

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """Draft for every request together: one batched head step per drafted token."""
        t0 = time.perf_counter()
        weights = self._weights  # one snapshot for the whole call
        drafts = [DraftTree.empty() for _ in requests]
        live: list[int] = []
        features: list[torch.Tensor] = []
        for i, request in enumerate(requests):
            self.observe_context(request.seq_id, request.context)
            feature = self._last_feature(request)
            if feature is not None and request.lookahead > 0:
                live.append(i)
                features.append(feature)
        if live:
            self._draft(weights, [requests[i] for i in live], features, [drafts[i] for i in live])
        self.proposed_calls += 1
        self.drafted_tokens += sum(len(d.tokens) for d in drafts)
        self.draft_s += time.perf_counter() - t0
        return drafts

    def _last_feature(self, request: DraftRequest) -> torch.Tensor | None:
        """The target's feature of ``context[-2]``; None when it is not (yet) recorded."""
        if len(request.context) < 2:
            return None
        try:
            hidden = self.target.hidden(request.seq_id)
        except (KeyError, RuntimeError):
            return None
        row = len(request.context) - 2
        return hidden[row] if row < hidden.shape[0] else None

    def _draft(
        self,
        weights: HeadWeights,
        requests: list[DraftRequest],
        features: list[torch.Tensor],
        drafts: list[DraftTree],
    ) -> None:
        embed = self.target.model.get_input_embeddings()
        device = self.target.device
        feature = torch.stack(features).to(device=device, dtype=self.dtype)
        token = torch.tensor([r.context[-1] for r in requests], dtype=torch.long, device=device)
        sampled: list[list[torch.Tensor]] = [[] for _ in requests]
        active = list(range(len(requests)))  # indices into requests, aligned with rows
        eos = self.target.eos_token_ids
        while active:
            feature = weights.head(feature, embed(token).to(self.dtype))
            logits = weights.logits(feature)
            choices, confidences = _choose(logits, [requests[i] for i in active], sampled, active)
            chosen = weights.vocab[choices].tolist()
            keep: list[int] = []
            for row, i in enumerate(active):
                draft, request = drafts[i], requests[i]
                draft.tokens.append(chosen[row])
                draft.confidences.append(confidences[row])
                done = len(draft.tokens) >= request.lookahead or chosen[row] in eos
                if not done and request.stop is not None:
                    done = not request.stop.keep_going(draft.confidences)
                if not done:
                    keep.append(row)
            active = [active[row] for row in keep]
            if keep:
                index = torch.tensor(keep, dtype=torch.long, device=device)
                feature = feature.index_select(0, index)
                token = weights.vocab[choices[keep]].to(device)
        for i, rows in enumerate(sampled):
            if rows:
                q = torch.zeros(len(rows), self.target.vocab_size, dtype=torch.float32)
                q[:, weights.vocab] = torch.stack(rows).cpu()
                drafts[i].probs = q

    def rollback(self, seq_id: str, context: list[int]) -> None:
        """Nothing to undo: drafts read the target's hidden states, which the engine
        rolls back itself."""

    def release(self, seq_id: str) -> None:
        """Forget the sequence; hand its tokens and the target's features to the learner.

        The engine releases speculators before the target, so the finished sequence's
        hidden states are still there. Rows past the last context seen are of tokens this
        drafter never saw: they are cut."""
        context = self._contexts.pop(seq_id, None)
        if context is None or self.learner is None:
            return
        try:
            hidden = self.target.hidden(seq_id)
        except (KeyError, RuntimeError):
            return
        rows = min(len(context) - 1, int(hidden.shape[0]))
        if rows < 2:
            return
        sequence = FinishedSequence(list(context[: rows + 1]), hidden[:rows].clone())
        self.learner.submit(sequence)

    @property
    def live_sequences(self) -> int:
        return len(self._contexts)

    def stats(self) -> dict[str, Any]:
        per_token = self.draft_s / self.drafted_tokens if self.drafted_tokens else 0.0
        return {
            "version": self.version,
            "propose_calls": self.proposed_calls,
            "drafted_tokens": self.drafted_tokens,
            "draft_s": round(self.draft_s, 4),
            "draft_s_per_token": round(per_token, 6),
        }


def _choose(
    logits: torch.Tensor,
    requests: list[DraftRequest],
    sampled: list[list[torch.Tensor]],
    active: list[int],
) -> tuple[torch.Tensor, list[float]]:
    """Pick each row's draft index: argmax when greedy, a sample when not.

    A sampled row's distribution is recorded: rejection sampling needs the q it was
    drawn from. Greedy confidences are the head's softmax at temperature 1."""
    choices = logits.argmax(dim=-1)
    confidences = logits.softmax(dim=-1).gather(-1, choices[:, None])[:, 0].tolist()
    choices = choices.cpu()
    for row, request in enumerate(requests):
        if request.params.greedy:
            continue
        q = probs_from_logits(logits[row : row + 1], request.params)[0]
        index = int(torch.multinomial(q, 1, generator=request.generator))
        choices[row] = index
        confidences[row] = float(q[index])
        sampled[active[row]].append(q)
    return choices, confidences


# -- weights files -----------------------------------------------------------------------


def save_weights(weights: HeadWeights, identity: TargetIdentity, path: str | Path) -> Path:
    """safetensors (head in float32, draft vocabulary) + JSON metadata, via tmp + rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().float().cpu().contiguous()
               for k, v in weights.head.state_dict().items()}  # fmt: skip
    tensors["vocab"] = weights.vocab.cpu().contiguous()
    meta = {
        "format": FORMAT,
        "target": identity.__dict__,
        "config": weights.config.__dict__,
        "version": weights.version,
        "meta": weights.meta,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"atlas": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other readers of the volume
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a weights file; WeightsError if it cannot be read.
    A head is a few MB: read whole, then parsed as a remote store's bytes are."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    return read_weights_bytes(path.read_bytes(), str(path))


def read_weights_bytes(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``read_weights_file`` for a file's bytes (a version read from a remote store);
    ``where`` names it in errors."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        # safetensors: an 8-byte little-endian header length, then the JSON header.
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        meta = json.loads(header["atlas"])
    except KeyError as exc:
        raise WeightsError(f"{where}: not an atlas neural head (no metadata {exc})") from exc
    except Exception as exc:  # safetensors raises its own error types for bad bytes
        raise WeightsError(f"{where}: corrupt or truncated weights file ({exc})") from exc
    return tensors, _checked_format(meta, where)


def _checked_format(meta: Any, where: str | Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise WeightsError(f"{where}: unknown format {found!r}, expected {FORMAT}")
    return meta


def load_weights(
    speculator: NeuralSpeculator, path: str | Path | bytes, where: str = ""
) -> HeadWeights:
    """Check a weights file (a path, or its bytes named ``where``) against the
    speculator's target and build a serving snapshot; WeightsError on anything wrong."""
    if isinstance(path, bytes):
        name = where or "weights"
        tensors, meta = read_weights_bytes(path, name)
    else:
        name = str(path)
        tensors, meta = read_weights_file(path)
    problem = speculator.identity.mismatch(meta.get("target", {}))
    if problem:
        raise WeightsError(f"{name}: {problem}")
    config = meta.get("config", {})
    if config.get("intermediate_size") != speculator.config.intermediate_size:
        raise WeightsError(
            f"{name}: head intermediate size {config.get('intermediate_size')}, "
            f"this speculator's is {speculator.config.intermediate_size}"
        )
    state = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    if "vocab" not in tensors:
        raise WeightsError(f"{name}: no draft vocabulary")
    expected = DraftHead(speculator.config).state_dict()
    for key, value in expected.items():
        got = state.get(key)
        if got is None or got.shape != value.shape:
            shape = None if got is None else tuple(got.shape)
            raise WeightsError(f"{name}: {key} has shape {shape}, expected {tuple(value.shape)}")
        if not torch.isfinite(got).all():
            raise WeightsError(f"{name}: {key} holds non-finite values")
    if set(state) != set(expected):
        raise WeightsError(f"{name}: unexpected tensors {sorted(set(state) - set(expected))}")
    version = meta.get("version")
    if not isinstance(version, int):
        raise WeightsError(f"{name}: no version")
    return speculator.make_weights(state, tensors["vocab"], version, meta.get("meta") or {})


def load_cached(speculator: NeuralSpeculator, log: Callable[[str], None] | None = None) -> bool:
    """Serve the warm-start head cached for this target in ``$ATLAS_HOME``, if one is."""
    path = default_weights_path(speculator.identity)
    if not path.is_file():
        return False
    try:
        speculator.load(path)
    except WeightsError as exc:
        if log is not None:
            log(f"ignoring cached neural head: {exc}")
        return False
    return True
