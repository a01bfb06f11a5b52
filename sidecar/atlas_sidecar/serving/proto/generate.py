"""Regenerate (or check) the Python code for the .proto files with the pinned grpcio-tools.

Reproducible: the same grpcio-tools version (pinned in pyproject's `serve` extra) always
writes the same bytes, and ``--check`` (run by the tests) fails when the checked-in
files differ from a fresh generation.

    python -m atlas_sidecar.serving.proto.generate           # rewrite the generated files
    python -m atlas_sidecar.serving.proto.generate --check   # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
# Compile relative to the folder holding the package, so the generated stub imports
# its messages as ``atlas_sidecar.serving.proto.atlas_v1_pb2`` rather than a top-level module.
SOURCE_ROOT = PROTO_DIR.parent.parent.parent
PROTO_FILES = (
    "atlas_sidecar/serving/proto/atlas_v1.proto",
    "atlas_sidecar/serving/proto/trainer_v1.proto",
)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Generated code is not ours to lint or type-check line by line.
HEADER = "# ruff: noqa\n# mypy: ignore-errors\n"


def generated_names() -> list[str]:
    stems = [Path(p).stem for p in PROTO_FILES]
    return [stem + suffix for stem in stems for suffix in GENERATED_SUFFIXES]


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` (mirroring the package layout); return the files."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{SOURCE_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    out_dir = out_root / "atlas_sidecar" / "serving" / "proto"
    files = [out_dir / name for name in generated_names()]
    for path in files:
        text = path.read_text()
        if not text.startswith(HEADER):
            path.write_text(HEADER + text)
    return files


def stale_files() -> list[str]:
    """Names of checked-in generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (PROTO_DIR / f.name).is_file()
            or (PROTO_DIR / f.name).read_bytes() != f.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PROTO_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(f"wrote {PROTO_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
