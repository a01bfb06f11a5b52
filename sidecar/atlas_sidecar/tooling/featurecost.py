"""What it costs to read the target's hidden states out of SGLang, per verify step.

The neural speculator drafts from the target's final hidden states. SGLang returns them
only as JSON (``return_hidden_states``, with the server started with
``--enable-return-hidden-states``): its scheduler turns the tensor into Python lists
(``tensor.cpu().tolist()``, ``batch_result_processor.py``), its HTTP server encodes the
answer with orjson, and the sidecar decodes it and turns it back into a tensor. A verify
step of a k-token draft needs the k + 1 new positions' states. This prints, for hidden
sizes from a small model to a 70B one, the bytes on the wire and the CPU milliseconds
of that round (both ends, on this machine), so that the neural head's cost through
SGLang can be set against a verify forward's.

    python -m atlas_sidecar.tooling.featurecost --out bench-out/featurecost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

HIDDEN_SIZES = (576, 1536, 4096, 8192)  # SmolLM2-135M, Qwen2.5-1.5B, 8B, 70B
ROWS = (1, 5, 9)  # k + 1 positions for drafts of 0, 4 and 8 tokens
BATCHES = (1, 16)


def one_round(rows: int, hidden: int, batch: int, generator: torch.Generator) -> tuple[int, float]:
    """(bytes, seconds) of shipping ``batch`` sequences' [rows, hidden] bf16 states as
    SGLang does: tolist and orjson on the server, json and a tensor on the client."""
    import orjson  # SGLang's own encoder (ORJSONResponse); a dependency of the bench

    states = [
        torch.randn(rows, hidden, generator=generator).to(torch.bfloat16) for _ in range(batch)
    ]
    start = time.perf_counter()
    answers = [{"meta_info": {"hidden_states": [s.float().tolist()]}} for s in states]
    wire = orjson.dumps(answers)
    decoded = json.loads(wire)
    tensors = [torch.tensor(a["meta_info"]["hidden_states"][0]) for a in decoded]
    seconds = time.perf_counter() - start
    assert tensors[0].shape == (rows, hidden)
    return len(wire), seconds


def measure(repeats: int = 5) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    table = []
    for hidden in HIDDEN_SIZES:
        for batch in BATCHES:
            for rows in ROWS:
                samples = [one_round(rows, hidden, batch, generator) for _ in range(repeats)]
                table.append({
                    "hidden": hidden, "batch": batch, "rows": rows,
                    "bytes": samples[0][0],
                    "ms": round(statistics.median(s for _, s in samples) * 1e3, 3),
                })  # fmt: skip
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    lines = ["hidden  batch  rows  KiB on the wire  ms (both ends)", "-" * 52]
    for row in table:
        lines.append(f"{row['hidden']:>6}  {row['batch']:>5}  {row['rows']:>4}  "
                     f"{row['bytes'] / 1024:>15.1f}  {row['ms']:>14.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench-out/featurecost.json")
    args = parser.parse_args(argv)
    table = measure(args.repeats)
    print(format_table(table))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rounds": table}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
