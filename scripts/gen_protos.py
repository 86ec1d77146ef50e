"""Generate the Python gRPC stubs for protos/imsearch/v1/*.proto.

Run from anywhere: `python scripts/gen_protos.py`. The stubs are written next to the
.proto files and import as `protos.imsearch.v1.<name>_pb2` (the proto include root is the
repository root), so no sys.path edits are needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "imsearch" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path = ROOT, descriptor_out: Path | None = None) -> None:
    """Run protoc on every proto; write stubs under out_dir (and a descriptor set if asked)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if descriptor_out is not None:
        args.append(f"--descriptor_set_out={descriptor_out}")
    args += [str(p.relative_to(ROOT)) for p in proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate()
    print("generated stubs for:", ", ".join(p.name for p in proto_files()), file=sys.stderr)
