"""Regenerate the protobuf/gRPC code in tidelog/v1 from proto/tidelog/v1/*.proto.

    python scripts/gen_proto.py          # rewrite the generated files
    python scripts/gen_proto.py --check  # exit 1 when the committed files are stale

Needs the dev extra (grpcio-tools, mypy-protobuf). The generated files are committed so a
plain `pip install` needs no code generator.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = ROOT / "tidelog" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # imported here: only the dev extra has it

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    # protoc finds the mypy plugins on PATH; they sit beside this interpreter in a venv.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generated_files(package_dir: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in package_dir.iterdir()
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when generated code is stale")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(tmp)
        generate(out_root)
        fresh = generated_files(out_root / "tidelog" / "v1")
        current = generated_files(OUT_PACKAGE)
        if ns.check:
            stale = sorted(
                name
                for name in fresh.keys() | current.keys()
                if name not in fresh
                or name not in current
                or not filecmp.cmp(fresh[name], current[name], shallow=False)
            )
            if stale:
                print(
                    f"generated protobuf code is stale: {', '.join(stale)}; "
                    "run: python scripts/gen_proto.py",
                    file=sys.stderr,
                )
                return 1
            print(f"generated protobuf code is up to date ({len(fresh)} files)")
            return 0
        for path in current.values():
            path.unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, OUT_PACKAGE / name)
        print(f"wrote {len(fresh)} files to {OUT_PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
