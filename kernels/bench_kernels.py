"""Benchmark the verification kernels: prints a table and writes JSON.

    python kernels/bench_kernels.py                      # Qwen-like: N=8, K=16, V=151936, bf16
    python kernels/bench_kernels.py --vocab 32000 --out bench-out/kernels.json

Always times the PyTorch reference on CPU; where CUDA exists, also the reference and
the Triton kernel on the GPU, and the host loop the engine runs today (argmax, copy
the tokens to the host, walk each sequence in Python). Each row says whether its
result equals the reference's. rejection_sample verifies one sampled chain (the first
sequence's K drafts, float32 probabilities), each call from a generator seeded alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atlas_kernels import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(
    rows: int, num_draft: int, vocab: int, dtype: torch.dtype, pad_past: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random logits; chains that follow the target for a random while; random trees."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, num_draft + 1, vocab, generator=generator).to(dtype)
    target = logits.argmax(dim=-1)
    chain = target[:, :num_draft].clone()
    breaks = torch.randint(0, num_draft + 1, (rows,), generator=generator)
    for row in range(rows):
        if int(breaks[row]) < num_draft:
            chain[row, int(breaks[row])] = (chain[row, int(breaks[row])] + 1) % vocab
    parents = torch.stack(
        [
            torch.tensor(
                [int(torch.randint(-1, i, (1,), generator=generator)) for i in range(num_draft)]
            )
            for _ in range(rows)
        ]
    ).reshape(rows, num_draft)
    tree = target.gather(1, parents + 1)  # every node agrees with the target: a deep walk
    # One sampled chain, as sampling.verify hands it over: float32 target probabilities
    # of the first sequence, and a drafter whose logits are the target's plus noise,
    # close enough that a draft survives several positions before a rejection.
    target_probs = logits[0].float().softmax(dim=-1)
    noise = torch.randn(num_draft, vocab, generator=generator)
    draft_probs = (logits[0, :num_draft].float() + noise).softmax(dim=-1)
    sampled = torch.multinomial(draft_probs, 1, generator=generator)[:, 0]
    return {
        "logits": logits,
        "chain": chain,
        "lens": torch.full((rows,), num_draft),
        "tree": tree,
        "parents": parents,
        "nodes": torch.full((rows,), num_draft),
        "past": torch.randint(0, pad_past + 1, (rows,), generator=generator),
        "target_probs": target_probs,
        "draft_probs": draft_probs,
        "sampled": sampled,
    }


def host_greedy(logits: torch.Tensor, draft: torch.Tensor, lens: torch.Tensor) -> list[Any]:
    """What the engine does per sequence today: argmax, copy to the host, walk."""
    out = []
    for row in range(logits.shape[0]):
        tokens = logits[row].argmax(dim=-1).tolist()
        wanted = draft[row, : int(lens[row])].tolist()
        accepted = 0
        while accepted < len(wanted) and wanted[accepted] == tokens[accepted]:
            accepted += 1
        out.append((accepted, tokens[accepted]))
    return out


def host_tree(
    logits: torch.Tensor, draft: torch.Tensor, parents: torch.Tensor, nodes: torch.Tensor
) -> list[Any]:
    out = []
    for row in range(logits.shape[0]):
        tokens = logits[row].argmax(dim=-1).tolist()
        count = int(nodes[row])
        row_draft, row_parents = draft[row, :count].tolist(), parents[row, :count].tolist()
        path, current = [], -1
        while True:
            wanted = tokens[current + 1]
            child = next(
                (c for c in range(count) if row_parents[c] == current and row_draft[c] == wanted),
                None,
            )
            if child is None:
                break
            path.append(child)
            current = child
        out.append((path, tokens[current + 1]))
    return out


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of one call, in milliseconds, device work included."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def same(got: Any, expected: Any) -> bool:
    if isinstance(got, torch.Tensor):
        return torch.equal(got.cpu(), expected.cpu())
    if not isinstance(got, tuple | list):
        return bool(got == expected)
    return all(same(a, b) for a, b in zip(got, expected, strict=True))


def seeded(device: torch.device) -> torch.Generator:
    """A fresh generator per call, so every implementation draws the same numbers."""
    return torch.Generator(device=device).manual_seed(0)


def cases(
    inputs: dict[str, torch.Tensor], pad_past: int
) -> dict[str, dict[str, Callable[[], Any]]]:
    """Per operation: the reference and, by name, the other ways of computing it."""
    x = inputs
    device = x["logits"].device
    ops: dict[str, dict[str, Callable[[], Any]]] = {
        "greedy_accept": {
            "reference": lambda: reference.greedy_accept_reference(
                x["logits"], x["chain"], x["lens"]
            ),
            "host_loop": lambda: host_greedy(x["logits"], x["chain"], x["lens"]),
        },
        "tree_accept": {
            "reference": lambda: reference.tree_accept_reference(
                x["logits"], x["tree"], x["parents"], x["nodes"]
            ),
            "host_loop": lambda: host_tree(x["logits"], x["tree"], x["parents"], x["nodes"]),
        },
        "tree_attention_mask": {
            "reference": lambda: reference.tree_attention_mask_reference(
                x["parents"], x["nodes"], x["past"], pad_past
            ),
        },
        "rejection_sample": {
            "reference": lambda: reference.rejection_sample_reference(
                x["target_probs"], x["draft_probs"], x["sampled"], seeded(device)
            ),
        },
    }
    if x["logits"].is_cuda:
        from atlas_kernels import triton_impl

        ops["greedy_accept"]["triton"] = lambda: triton_impl.greedy_accept(
            x["logits"], x["chain"], x["lens"]
        )
        ops["tree_accept"]["triton"] = lambda: triton_impl.tree_accept(
            x["logits"], x["tree"], x["parents"], x["nodes"]
        )
        ops["tree_attention_mask"]["triton"] = lambda: triton_impl.tree_attention_mask(
            x["parents"], x["nodes"], x["past"], pad_past
        )
        ops["rejection_sample"]["triton"] = lambda: triton_impl.rejection_sample(
            x["target_probs"], x["draft_probs"], x["sampled"], seeded(device)
        )
    return ops


def as_reference(op: str, impl: str, result: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """Host-loop results in the reference's tensor form, to compare."""
    if impl != "host_loop":
        return result
    if op == "greedy_accept":
        return torch.tensor([a for a, _ in result]), torch.tensor([b for _, b in result])
    width = inputs["tree"].shape[1]
    path = torch.tensor([p + [-1] * (width - len(p)) for p, _ in result]).reshape(-1, width)
    return path, torch.tensor([len(p) for p, _ in result]), torch.tensor([b for _, b in result])


def run(args: argparse.Namespace) -> dict[str, Any]:
    host = make_inputs(args.rows, args.draft, args.vocab, DTYPES[args.dtype], args.pad_past, 0)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    results = []
    for device in devices:
        inputs = {name: tensor.to(device) for name, tensor in host.items()}
        repeats = args.repeats if device.type == "cuda" else max(1, args.repeats // 4)
        for op, impls in cases(inputs, args.pad_past).items():
            expected = impls["reference"]()
            for impl, fn in impls.items():
                ok = same(as_reference(op, impl, fn(), inputs), expected)
                ms = time_ms(fn, device, repeats)
                results.append(
                    {
                        "op": op,
                        "device": device.type,
                        "impl": impl,
                        "ms": ms,
                        "matches_reference": ok,
                    }
                )
    return {
        "config": {
            "rows": args.rows,
            "draft": args.draft,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "pad_past": args.pad_past,
            "repeats": args.repeats,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    config = report["config"]
    print(
        f"N={config['rows']} K={config['draft']} V={config['vocab']} {config['dtype']} "
        f"pad_past={config['pad_past']}  gpu: {report['machine']['gpu'] or 'none'}"
    )
    print(f"{'op':<20} {'device':<6} {'impl':<10} {'ms':>10} {'speedup':>8}  matches")
    baseline: dict[tuple[str, str], float] = {}
    for row in report["results"]:
        key = (row["op"], row["device"])
        baseline.setdefault(key, row["ms"])  # the reference comes first per (op, device)
        speedup = baseline[key] / row["ms"] if row["ms"] else float("inf")
        print(
            f"{row['op']:<20} {row['device']:<6} {row['impl']:<10} {row['ms']:>10.3f} "
            f"{speedup:>7.2f}x  {'yes' if row['matches_reference'] else 'NO'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="sequences in the batch (N)")
    parser.add_argument("--draft", type=int, default=16, help="draft tokens per sequence (K)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (V)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--pad-past", type=int, default=2048, help="padded cache length")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls on GPU (CPU: 1/4)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/kernels.json"))
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(row["matches_reference"] for row in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
