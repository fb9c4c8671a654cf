"""Generate the Python code for protos/ into client/lossd/ (committed).

    .venv/bin/python scripts/gen_protos.py          # write
    .venv/bin/python scripts/gen_protos.py --check  # exit 1 if the committed code drifted

Uses the grpcio-tools pinned in pyproject's dev extra, so the output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def protos() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    """Run protoc for every .proto under protos/, writing packages under ``out``."""
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}"]
    args += [str(p.relative_to(PROTO_ROOT)) for p in protos()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.name.endswith(GENERATED_SUFFIXES)}


def check() -> list[str]:
    """Names of generated files that differ from a fresh generation (empty: in sync)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp))
        committed = generated_files(OUT_ROOT)
        names = set(fresh) | set(committed)
        return sorted(n for n in names if n not in fresh or n not in committed
                      or not filecmp.cmp(fresh[n], committed[n], shallow=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    if parser.parse_args().check:
        drift = check()
        for name in drift:
            print(f"drifted: {name}", file=sys.stderr)
        return 1 if drift else 0
    generate(OUT_ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
