"""The ``arcfab`` command. ``arcfab serve`` runs the web service with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence

from arcfab_gym.service.settings import ServiceSettings

__all__ = ["build_parser", "main", "settings_from_args"]

TOKEN_ENV = "ARCFAB_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arcfab", description="arcfab-gym: Arc Fabric state management over world models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = ServiceSettings()
    serve = sub.add_parser(
        "serve",
        help="run the web service (API, live events and the tree explorer page)",
        description="Serve sessions of any registered world model over HTTP and websocket.",
    )
    serve.add_argument("--host", default=defaults.host, help="bind address (default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port,
                       help="port (default %(default)s; 0 picks a free one)")  # fmt: skip
    serve.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token required on every request (default: ${TOKEN_ENV}; unset: open)",
    )
    serve.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                       help="open sessions allowed at once (default %(default)s)")  # fmt: skip
    serve.add_argument(
        "--store-budget-mb",
        type=float,
        default=defaults.store_budget_bytes / 2**20,
        help="memory budget of all checkpoint stores in MiB; 0 = unlimited "
        "(default %(default)s); beyond it new checkpoints are refused (HTTP 507)",
    )
    serve.add_argument(
        "--max-body-kb",
        type=int,
        default=defaults.max_upload_bytes // 2**10,
        help="largest snapshot upload in KiB (default %(default)s); other requests are "
        f"limited to min(this, {defaults.max_json_bytes // 2**10}) KiB",
    )
    serve.add_argument("--backend-default", default=defaults.backend_default,
                       help="backend of sessions that name none (default %(default)s)")  # fmt: skip
    serve.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default %(default)s: requests on different trees run "
        "in parallel instead, and multi-threaded ops degrade badly on a busy machine)",
    )
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip
    return parser


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    upload = args.max_body_kb * 2**10
    return ServiceSettings(
        host=args.host,
        port=args.port,
        token=args.token,
        max_sessions=args.max_sessions,
        store_budget_bytes=None if args.store_budget_mb == 0 else int(args.store_budget_mb * 2**20),
        max_upload_bytes=upload,
        max_json_bytes=min(upload, ServiceSettings().max_json_bytes),
        backend_default=args.backend_default,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: ServiceSettings, log_level: str = "info", torch_threads: int = 1) -> None:
    import torch
    import uvicorn

    from arcfab_gym.models import list_world_models
    from arcfab_gym.service.app import create_app

    if settings.backend_default not in list_world_models():
        raise SystemExit(
            f"arcfab serve: --backend-default {settings.backend_default!r} is not registered; "
            f"choose one of {', '.join(list_world_models())}"
        )
    if settings.token is None and not _is_loopback(settings.host):
        print(
            f"arcfab serve: warning: listening on {settings.host} without a token; anyone "
            f"who can reach it can drive the server (set --token or ${TOKEN_ENV})",
            file=sys.stderr,
        )
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        ws_max_size=settings.max_json_bytes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValueError as exc:
            raise SystemExit(f"arcfab serve: {exc}") from None
        serve(settings, args.log_level, args.torch_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
