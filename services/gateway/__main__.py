"""python -m services.gateway --router HOST:PORT --index ROOT [--host H] [--port P]"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--router", required=True, help="router address host:port")
    ap.add_argument("--index", required=True, help="index root (for thumbnails and uri lookups)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="default: IMSEARCH_GATEWAY_PORT")
    return ap


def main() -> None:
    import uvicorn

    from services.common import tracing
    from services.common.config import get_settings
    from services.common.logs import setup_logging
    from services.gateway.app import create_app

    args = build_parser().parse_args()
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    tracing.setup("gateway", settings)
    port = settings.gateway_port if args.port is None else args.port
    print(f"imsearch gateway on http://{args.host}:{port}/ (router {args.router})", flush=True)
    # A client's address comes from X-Forwarded-For only when the peer is a trusted proxy (an ingress).
    uvicorn.run(create_app(args.router, args.index, settings), host=args.host, port=port, log_level="warning",
                proxy_headers=True, forwarded_allow_ips=settings.gateway_trusted_proxies)


if __name__ == "__main__":
    main()
