"""The sidecar's subcommands: ``atlas serve``, ``atlas loadtest``, ``atlas generate --endpoint``.

Parsers are registered without importing grpc or torch, so ``atlas --help`` stays fast;
each command imports what it needs when it runs. Tokens come from files or the
environment, never from the command line (where ``ps`` would show them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_sidecar import models

AUTH_TOKEN_ENV = "ATLAS_AUTH_TOKEN"
ADMIN_TOKEN_ENV = "ATLAS_ADMIN_TOKEN"
MODEL_REVISION_ENV = "ATLAS_MODEL_REVISION"
DRAFT_REVISION_ENV = "ATLAS_DRAFT_REVISION"
DRAFT_ARCHITECTURE_ENV = "ATLAS_DRAFT_ARCHITECTURE"
# What a --draft may be: a causal LM with the target's tokenizer. EAGLE heads (the CRD's
# eagle, eagle3) need the target's hidden states, which this sidecar does not load yet.
DRAFT_ARCHITECTURES = ("draft-lm",)

# Every environment variable `atlas serve` reads as configuration, and what for: the one
# list of them. The operator may render these and no others, and each must have an
# effect (tests/operator/test_contract.py checks both).
SERVE_ENV = {
    AUTH_TOKEN_ENV: "bearer token every RPC must carry (or --auth-token-file)",
    ADMIN_TOKEN_ENV: "token of the admin RPCs (or --admin-token-file); unset: admin is off",
    MODEL_REVISION_ENV: "the target's hub revision (SGLang's --revision): the tokenizer "
                        "and config are read from that snapshot",
    DRAFT_REVISION_ENV: "the hub revision of --draft",
    DRAFT_ARCHITECTURE_ENV: "what --draft is; only draft-lm is served (default)",
    models.MODEL_OVERRIDES_ENV: "ref=replacement,...: model references replaced before "
                                "loading (hub ids to mounted folders, offline)",
    models.ATLAS_HOME_ENV: "the registry's model cache (default $HOME/.cache/atlas)",
    "HOME": "where $ATLAS_HOME defaults to",
    "HF_HOME": "the Hugging Face cache that hub ids are read from (SGLang's, in a pod)",
}
BACKENDS = ("torch", "sglang", "triton")
SPECULATORS = ("atlas", "static", "suffix", "none")


def _read_token(path: str | None, env: str) -> str | None:
    if path:
        token = Path(path).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    return os.environ.get(env) or None


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """Where the target runs: in this process, or a server (``atlas serve``, ``atlas
    bench``)."""
    p.add_argument("--backend", default="torch",
                   help="target backend: torch (in-process), sglang (a server; greedy "
                        "and sampled) or triton (TensorRT-LLM; greedy only)")  # fmt: skip
    p.add_argument("--sglang-url", help="the SGLang server, for --backend sglang")
    p.add_argument("--sglang-timeout", type=float, default=30.0,
                   help="seconds per SGLang call before the request fails UNAVAILABLE")  # fmt: skip
    p.add_argument("--sglang-wait", type=float, default=600.0,
                   help="seconds to wait at start-up for SGLang to be healthy")  # fmt: skip
    p.add_argument("--triton-url",
                   help="Triton's gRPC address host:port, for --backend triton")  # fmt: skip
    p.add_argument("--triton-model", default="tensorrt_llm",
                   help="the TensorRT-LLM model Triton serves (draft_tokens_external)")  # fmt: skip
    p.add_argument("--triton-max-draft-len", type=int, default=10,
                   help="the engine's trtllm-build --max_draft_len: longer drafts are "
                        "verified in several requests")  # fmt: skip
    p.add_argument("--triton-timeout", type=float, default=30.0,
                   help="seconds per Triton call before the request fails UNAVAILABLE")  # fmt: skip
    p.add_argument("--triton-wait", type=float, default=600.0,
                   help="seconds to wait at start-up for Triton's model to be ready")  # fmt: skip


def check_backend_args(args: argparse.Namespace) -> None:
    if args.backend not in BACKENDS:
        raise ValueError(
            f"backend {args.backend!r} is not available yet; use one of: {', '.join(BACKENDS)}"
        )
    if args.backend == "sglang" and not args.sglang_url:
        raise ValueError("--backend sglang needs --sglang-url http://host:port")
    if args.backend == "triton" and not args.triton_url:
        raise ValueError("--backend triton needs --triton-url host:port (gRPC)")


def load_target(args: argparse.Namespace, target_ref: str) -> Any:
    """The target backend ``args`` name, ready to verify: a model loaded here, or a
    server waited for (bounded by --sglang-wait / --triton-wait) and checked to serve a
    model that tokenizes as ``target_ref`` does."""
    if args.backend == "sglang":
        # SGLang holds the target's weights: the sidecar loads only its tokenizer and
        # config, and checks that SGLang's model tokenizes the same way.
        from atlas_sidecar.engine.backends.sglang import SGLangBackend, target_spec

        target: Any = SGLangBackend(args.sglang_url, target_spec(target_ref),
                                    timeout_s=args.sglang_timeout)  # fmt: skip
        target.wait_ready(timeout_s=args.sglang_wait)
        return target
    if args.backend == "triton":
        # TensorRT-LLM in Triton holds the weights and verifies drafts itself.
        from atlas_sidecar.engine.backends.sglang import target_spec
        from atlas_sidecar.engine.backends.triton import TritonBackend

        target = TritonBackend(args.triton_url, target_spec(target_ref), model=args.triton_model,
                               timeout_s=args.triton_timeout,
                               max_draft_len=args.triton_max_draft_len)  # fmt: skip
        target.wait_ready(timeout_s=args.triton_wait)
        return target
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

    return CausalLMRunner.load(target_ref, dtype=args.dtype, device=args.device)


# -- atlas serve ------------------------------------------------------------------------


def add_serve_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("serve", help="run the gRPC sidecar (atlas.v1) around the engine")
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    add_backend_args(p)
    p.add_argument("--speculator", choices=SPECULATORS, default="atlas",
                   help="atlas: the controller picks suffix/static/none per step")  # fmt: skip
    p.add_argument("--draft-num-layers", type=int,
                   help="draft with the target's first N layers, not --draft")  # fmt: skip
    add_model_args(p)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoding at once")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before RESOURCE_EXHAUSTED")  # fmt: skip
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled per scheduler round, between the running "
                        "sequences' steps: a long prompt is prefilled in chunks")  # fmt: skip
    # Defaults (None) are the server's own Limits: one source of truth.
    p.add_argument("--max-prompt-tokens", type=int, help="default 8192")
    p.add_argument("--kv-budget-mb", type=float,
                   help="KV cache MiB the admitted requests may need at worst (prompt + "
                        "max_tokens + lookahead); more wait in the queue. Default: 80%% "
                        "of free GPU memory, or 50%% of free RAM; 0: no byte bound")  # fmt: skip
    p.add_argument("--max-prompt-chars", type=int, help="default 100000")
    p.add_argument("--max-tokens-limit", type=int,
                   help="largest max_tokens a request may ask for (default 4096)")  # fmt: skip
    p.add_argument("--max-message-bytes", type=int, default=4 << 20)
    p.add_argument("--max-concurrent-streams", type=int, default=256, help="per connection")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics; 0: off")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="/metrics address (no auth: 0.0.0.0 only to be scraped)")  # fmt: skip
    # Hardening; defaults (None) are ServerConfig's own. 0 turns an optional bound off.
    p.add_argument("--max-concurrent-rpcs", type=int,
                   help="RPCs in flight before RESOURCE_EXHAUSTED (default 1024)")  # fmt: skip
    p.add_argument("--queue-timeout", type=float,
                   help="seconds a request may wait for a batch slot (default 60)")  # fmt: skip
    p.add_argument("--keepalive-time", type=float, help="seconds between server pings (60)")
    p.add_argument("--keepalive-timeout", type=float, help="seconds to wait for a ping ack (20)")
    p.add_argument("--min-ping-interval", type=float,
                   help="fastest client ping allowed, seconds (10)")  # fmt: skip
    p.add_argument("--max-connection-idle", type=float, help="seconds (300)")
    p.add_argument("--max-connection-age", type=float, help="seconds (3600)")
    p.add_argument("--max-connection-age-grace", type=float, help="seconds (600)")
    p.add_argument("--health-port", type=int,
                   help="plaintext grpc.health.v1 on 127.0.0.1 only, for an exec probe "
                        "(python -m atlas_sidecar.serving.healthcheck) beside TLS")  # fmt: skip
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA for client certificates: mutual TLS")
    p.add_argument("--auth-token-file",
                   help=f"bearer token required on every RPC (or ${AUTH_TOKEN_ENV})")  # fmt: skip
    p.add_argument("--admin-token-file",
                   help=f"admin RPC token (or ${ADMIN_TOKEN_ENV}); none: admin off")  # fmt: skip
    p.add_argument("--weight-version-file", default="/etc/atlas/rollout/weight-version",
                   help="the rollout ConfigMap's weight-version file (read if present); "
                        "with --weights-store its directory's canary-version and "
                        "canary-fraction are followed too: a canary, promoted or rolled "
                        "back as the operator decides")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")  # fmt: skip
    p.add_argument("--log-prompts", action="store_true", help="log prompt text (off: privacy)")
    p.add_argument("--log-level", default="info")
    add_mirror_args(p)
    add_rollout_args(p)
    p.set_defaults(func=cmd_serve)


def add_rollout_args(p: argparse.ArgumentParser) -> None:
    """Hot rollout of published versions (off unless --weights-store is given)."""
    p.add_argument("--weights-store",
                   help="the trainer's weights store (a directory, file:///path or "
                        "s3://bucket/prefix): versions the rollout file, RolloutWeights or "
                        "--follow-latest name are verified there and swapped in live")  # fmt: skip
    p.add_argument("--canary-fraction", type=float, default=0.0,
                   help="share of new requests a version from RolloutWeights or "
                        "--follow-latest drafts for until promoted (0: it serves every "
                        "new request at once); the rollout files' canary has their own "
                        "canary-fraction")  # fmt: skip
    p.add_argument("--follow-latest", action="store_true",
                   help="install each new version the store verifies (a laptop or a "
                        "single replica); stands by once the rollout files name a "
                        "version: in a cluster the operator picks versions")  # fmt: skip


def rollout_settings(args: argparse.Namespace) -> tuple[str | None, float, bool]:
    """(store URI, canary fraction, follow latest), checked."""
    if not 0.0 <= args.canary_fraction < 1.0:
        raise ValueError("--canary-fraction must be within [0, 1)")
    if (args.canary_fraction or args.follow_latest) and not args.weights_store:
        raise ValueError("--canary-fraction and --follow-latest need --weights-store")
    return args.weights_store, args.canary_fraction, args.follow_latest


def add_mirror_args(p: argparse.ArgumentParser) -> None:
    """Traffic mirroring to the trainer (off unless --mirror-url is given)."""
    p.add_argument("--mirror-url",
                   help="the trainer's ingest address host:port (atlas.trainer.v1, "
                        "plaintext): mirror finished requests' token ids there")  # fmt: skip
    p.add_argument("--mirror-fraction", type=float, default=1.0,
                   help="share of finished requests mirrored, 0 to 1 (by request id)")  # fmt: skip
    p.add_argument("--mirror-spill-dir",
                   help="directory for records the trainer has not acked while it is "
                        "unreachable, replayed when it is back (none: they wait in "
                        "memory, and are dropped past --mirror-queue-bytes)")  # fmt: skip
    p.add_argument("--mirror-spill-bytes", type=int, default=1 << 30,
                   help="bound of the spill directory; past it records are dropped")  # fmt: skip
    p.add_argument("--mirror-queue-bytes", type=int, default=64 << 20,
                   help="encoded records held in memory, unsent or unacked")  # fmt: skip
    p.add_argument("--replica-name", default=socket.gethostname(),
                   help="this replica in mirrored request ids (default: the hostname)")  # fmt: skip


def mirror_config_from_args(args: argparse.Namespace) -> Any:
    """The MirrorConfig the flags ask for; None without --mirror-url."""
    from atlas_sidecar.serving.mirror import MirrorConfig

    if not args.mirror_url:
        return None
    if not 0.0 <= args.mirror_fraction <= 1.0:
        raise ValueError("--mirror-fraction must be within [0, 1]")
    if args.mirror_spill_bytes <= 0 or args.mirror_queue_bytes <= 0:
        raise ValueError("--mirror-spill-bytes and --mirror-queue-bytes must be positive")
    replica = args.replica_name.strip()
    if not replica or len(replica) > 128 or "/" in replica:
        raise ValueError("--replica-name must be 1 to 128 characters, without '/'")
    return MirrorConfig(
        url=args.mirror_url,
        replica=replica,
        fraction=args.mirror_fraction,
        queue_bytes=args.mirror_queue_bytes,
        spill_dir=Path(args.mirror_spill_dir) if args.mirror_spill_dir else None,
        spill_bytes=args.mirror_spill_bytes,
    )


def server_config_from_args(args: argparse.Namespace) -> Any:
    from atlas_sidecar.serving.app import ServerConfig, TlsConfig

    check_backend_args(args)
    if args.prefill_budget < 1:
        raise ValueError("--prefill-budget must be at least 1 token")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        tls = TlsConfig(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.tls_client_ca) if args.tls_client_ca else None,
        )
    elif args.tls_client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
        **_hardening(args),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        kv_budget_bytes=None if args.kv_budget_mb is None else int(args.kv_budget_mb * (1 << 20)),
        prefill_budget=args.prefill_budget,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_streams=args.max_concurrent_streams,
        limits=_limits(args),
        tls=tls,
        auth_token=_read_token(args.auth_token_file, AUTH_TOKEN_ENV),
        admin_token=_read_token(args.admin_token_file, ADMIN_TOKEN_ENV),
        weight_version_file=Path(args.weight_version_file) if args.weight_version_file else None,
        drain_timeout_s=args.drain_timeout,
        health_port=args.health_port,
        log_prompts=args.log_prompts,
        target_model=args.target,
        mirror=mirror_config_from_args(args),
        follow_latest=rollout_settings(args)[2],
    )


def _hardening(args: argparse.Namespace) -> dict[str, Any]:
    """The hardening flags given, as ServerConfig fields (0: no bound, where optional)."""
    flags = {
        "max_concurrent_rpcs": (args.max_concurrent_rpcs, True),
        "queue_timeout_s": (args.queue_timeout, True),
        "keepalive_time_s": (args.keepalive_time, False),
        "keepalive_timeout_s": (args.keepalive_timeout, False),
        "min_client_ping_interval_s": (args.min_ping_interval, False),
        "max_connection_idle_s": (args.max_connection_idle, True),
        "max_connection_age_s": (args.max_connection_age, True),
        "max_connection_age_grace_s": (args.max_connection_age_grace, True),
    }
    out: dict[str, Any] = {}
    for name, (value, optional) in flags.items():
        if value is None:
            continue
        if value < 0 or (value == 0 and not optional):
            raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be positive")
        out[name] = None if value == 0 else value
    return out


def _limits(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from atlas_sidecar.serving.requests import Limits

    given = {
        "max_prompt_chars": args.max_prompt_chars,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_tokens": args.max_tokens_limit,
    }
    return replace(Limits(), **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class ModelRefs:
    """The model references `atlas serve` loads, pinned by the environment."""

    target: str
    draft: str | None  # None: the speculator drafts without a model


def model_refs(args: argparse.Namespace) -> ModelRefs:
    """--target and --draft as loaded: each hub id pinned to the revision the environment
    names (the endpoint's model.revision and speculators.static.revision), and the draft
    refused unless $ATLAS_DRAFT_ARCHITECTURE is one this sidecar serves: an EAGLE head
    loaded as a causal LM would fail obscurely or draft garbage."""
    from atlas_sidecar.engine.build import NEEDS_DRAFT

    target = models.at_revision(args.target, os.environ.get(MODEL_REVISION_ENV))
    if args.speculator not in NEEDS_DRAFT:
        return ModelRefs(target, None)
    if args.draft_num_layers:
        return ModelRefs(target, target)  # the target's own first layers
    architecture = os.environ.get(DRAFT_ARCHITECTURE_ENV) or DRAFT_ARCHITECTURES[0]
    if architecture not in DRAFT_ARCHITECTURES:
        raise ValueError(
            f"${DRAFT_ARCHITECTURE_ENV}={architecture!r}: this sidecar drafts with "
            f"{', '.join(DRAFT_ARCHITECTURES)} models only (a causal LM sharing the "
            "target's tokenizer)"
        )
    return ModelRefs(target, models.at_revision(args.draft, os.environ.get(DRAFT_REVISION_ENV)))


def build_engine(args: argparse.Namespace, refs: ModelRefs) -> Any:
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
    from atlas_sidecar.engine.build import build_engine as build_mode

    target = load_target(args, refs.target)
    draft = None
    if refs.draft is not None:
        draft = CausalLMRunner.load(
            refs.draft,
            dtype=args.dtype,
            device=args.device,
            num_layers=args.draft_num_layers,
            weights=args.draft_weights,
        )
    return build_mode(args.speculator, target, draft, args.lookahead,
                      versioned=bool(args.weights_store))  # fmt: skip


def build_rollout(args: argparse.Namespace, refs: ModelRefs, engine: Any) -> Any:
    """The hot rollout over the engine's versioned drafters; None without a store."""
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
    from atlas_sidecar.learning import replica
    from atlas_sidecar.learning.published import target_identity
    from atlas_sidecar.learning.store import TargetIdentity, open_store

    uri, fraction, _ = rollout_settings(args)
    if uri is None:
        return None
    revision = os.environ.get(MODEL_REVISION_ENV) or ""
    target = engine.target
    if isinstance(target, CausalLMRunner):
        identity = target_identity(target, revision)
    else:  # a server's: no LM head here to fingerprint
        spec = target.spec
        identity = TargetIdentity(spec.name, revision, spec.hidden_size, spec.vocab_size)
    return replica.build_rollout(open_store(uri), identity, engine, target.vocab_size, fraction)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from atlas_sidecar.serving.app import serve
    from atlas_sidecar.serving.scheduler import WorkerDied

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = server_config_from_args(args)  # fail on bad flags before loading models
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.backend == "sglang":
        # Before the target's files are read: in a pod, SGLang downloads them into the
        # cache the sidecar shares, and is healthy only once its model is loaded.
        from atlas_sidecar.engine.backends.sglang import wait_healthy

        wait_healthy(args.sglang_url, args.sglang_wait)
    refs = model_refs(args)
    engine = build_engine(args, refs)
    try:
        asyncio.run(serve(engine, config, build_rollout(args, refs, engine)))
    except WorkerDied as exc:
        # Non-zero, so that Kubernetes restarts the container; the cause was logged.
        logging.getLogger(__name__).critical("exiting: %s (%r)", exc, exc.__cause__)
        return 1
    finally:
        from atlas_sidecar.engine.build import close_engine

        close_engine(engine)
    return 0


# -- the client side: endpoint flags, atlas generate --endpoint, atlas loadtest ---------


def add_generate_endpoint_args(p: argparse.ArgumentParser) -> None:
    """``atlas generate --endpoint host:port``: generate on a running sidecar."""
    p.add_argument("--endpoint", help="a sidecar's host:port; generate there, not in-process")
    add_endpoint_args(p)


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to trust; implies --tls")
    p.add_argument("--tls-cert", dest="client_cert", help="client certificate: mutual TLS")
    p.add_argument("--tls-key", dest="client_key", help="client private key: mutual TLS")
    p.add_argument("--token-file", help=f"bearer token (or ${AUTH_TOKEN_ENV})")
    p.add_argument("--timeout", type=float, help="deadline per request, seconds")


def client_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "token": _read_token(args.token_file, AUTH_TOKEN_ENV),
        "tls": args.tls,
        "ca_cert": Path(args.tls_ca) if args.tls_ca else None,
        "client_cert": Path(args.client_cert) if args.client_cert else None,
        "client_key": Path(args.client_key) if args.client_key else None,
    }


def generate_remote(args: argparse.Namespace) -> int:
    """``atlas generate --endpoint``: the same output as local generation, from a sidecar."""
    from atlas_sidecar.errors import RequestError
    from atlas_sidecar.serving.client import AtlasClient, AtlasError

    if not args.prompt.strip():
        raise RequestError("prompt", "must not be empty")
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": tuple(args.stop or ()),
    }
    if args.raw:
        prompt = {"prompt": args.prompt}
    else:
        prompt = {"messages": [{"role": "user", "content": args.prompt}]}
    try:
        with AtlasClient(args.endpoint, timeout=args.timeout, **client_settings(args)) as client:
            result = client.generate(**prompt, **sampling)
    except AtlasError as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        return 1
    print(result.text)
    usage = result.usage
    stats = {
        "completion_tokens": usage.completion_tokens,
        "prompt_tokens": usage.prompt_tokens,
        "finish_reason": result.finish_reason,
        "target_forwards": usage.target_forwards,
        "drafted": usage.drafted,
        "accepted": usage.accepted,
        "accept_len": round(usage.accept_len, 3),
        "speculators": [s.name for s in usage.speculators],
        "elapsed_s": round(usage.elapsed_s, 4),
        "endpoint": args.endpoint,
    }
    print(json.dumps(stats), file=sys.stderr)
    return 0


def add_loadtest_parser(sub: Any) -> None:
    p = sub.add_parser("loadtest", help="closed-loop load on sidecars: throughput, p50/p99")
    p.add_argument("--endpoint", action="append", required=True,
                   help="[name=]host:port; repeat to compare (spec=... plain=...)")  # fmt: skip
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workload", default="python", help="python, rust, chat or drift")
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts (cycled)")
    p.add_argument("--out", default="bench-out/loadtest.json", help="JSON output path")
    p.add_argument("--soak", action="store_true",
                   help="one endpoint, --duration seconds of mixed traffic (short, long and "
                        "random-id prompts, streams cancelled mid-way) at the largest "
                        "--concurrency: status counts, lost streams, RSS, chunk gaps")  # fmt: skip
    p.add_argument("--metrics-url",
                   help="soak: the server's /metrics, for its RSS (default: the endpoint's "
                        "host, port 9090)")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="soak: random prompt ids are drawn below this")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="soak: the traffic mix's seed")
    add_endpoint_args(p)
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from atlas_sidecar.tooling import loadtest, workloads

    endpoints = loadtest.parse_endpoints(args.endpoint)
    levels = loadtest.parse_levels(args.concurrency)
    loaders = {
        "python": workloads.humaneval,
        "rust": workloads.humaneval_rust,
        "chat": workloads.mtbench,
        "drift": lambda n: workloads.drift(max(1, n // 3)),
    }
    if args.workload not in loaders:
        raise ValueError(f"unknown workload {args.workload!r}; use one of {', '.join(loaders)}")
    prompts = loaders[args.workload](args.prompts)
    if args.soak:
        return _soak(args, endpoints, levels, prompts)
    print(f"{len(prompts)} {args.workload} prompts, {args.max_tokens} new tokens, "
          f"{args.duration:.0f} s per level\n{loadtest.HEADER}", flush=True)  # fmt: skip
    rows = asyncio.run(
        loadtest.run(
            endpoints, prompts, levels, args.duration, args.max_tokens, client_settings(args)
        )
    )
    config = {k: v for k, v in vars(args).items() if k != "func" and "token" not in k}
    loadtest.write_json(rows, Path(args.out), config)
    print(f"wrote {args.out}")
    return 0 if all(r.errors == 0 for r in rows) else 1


def _soak(args: argparse.Namespace, endpoints: Any, levels: list[int], prompts: Any) -> int:
    """Exit status 1 if any stream was lost or ended INTERNAL."""
    import asyncio

    from atlas_sidecar.tooling import loadtest

    if len(endpoints) != 1:
        raise ValueError("--soak drives one endpoint")
    address = endpoints[0][1]
    metrics_url = args.metrics_url or f"http://{address.rpartition(':')[0]}:9090/metrics"
    config = loadtest.SoakConfig(
        duration_s=args.duration,
        concurrency=max(levels),
        max_tokens=args.max_tokens,
        vocab_size=args.vocab_size,
        warmup_s=min(60.0, args.duration / 3),  # allocator and caches settle first
        seed=args.seed,
    )
    print(f"soak {address} for {args.duration:.0f} s at concurrency {config.concurrency}; "
          f"RSS from {metrics_url}", flush=True)  # fmt: skip
    report = asyncio.run(
        loadtest.run_soak(address, metrics_url, prompts, config, client_settings(args))
    )
    print(loadtest.format_soak(report), flush=True)
    loadtest.write_soak_json(report, Path(args.out))
    print(f"wrote {args.out}")
    return 1 if report.lost or report.statuses.get("INTERNAL") else 0
