"""python -m services.embedder --port 50051 --model lite1-gem"""

from __future__ import annotations

import argparse

from services.common import server
from services.embedder.service import serve


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="imsearch embedder: images -> vectors over gRPC")
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default=None, help="registry name, timm:<arch> or checkpoint (default: settings)")
    return ap


def main() -> None:
    args = build_parser().parse_args()

    async def start():
        running, batcher = await serve(args.port, model=args.model, host=args.host)
        return running, batcher.stop

    server.run_service(start, "embedder", args.host)


if __name__ == "__main__":
    main()
