"""``python -m filo serve``: the inspection service (REST API and a page to try prompts).

    python -m filo serve --ckpt_path ckpt/filo_train_on_visa.pth \\
        --grounded_checkpoint ckpt/grounding_train_on_visa.pth [--memory_bank banks/] \\
        --host 127.0.0.1 --port 8000

Open http://127.0.0.1:8000/ for the page; the API is described at /openapi.json. Every pipeline
flag of test.py applies. The models load once, before the port opens; requests arriving together
share a batch (--max_batch_size, --max_wait_ms); beyond --queue_size waiting requests the service
answers 503 with Retry-After. It binds 127.0.0.1 unless told otherwise; --token_file (or the
variable FILO_SERVE_TOKEN) makes every /v1 call need that bearer token.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from filo.cli.common import add_pipeline_args, add_verbose, setup_logging
from filo.errors import FiloError, cli_entry
from filo.service.config import ServiceConfig
from filo.settings import add_args

TOKEN_ENV = "FILO_SERVE_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m filo serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p.add_argument_group("service"), ServiceConfig)
    add_pipeline_args(p)
    add_verbose(p)
    return p


def read_token(config: ServiceConfig, env=os.environ) -> str | None:
    """The bearer token from --token_file (first line) or $FILO_SERVE_TOKEN; None: no token."""
    if config.token_file is not None:
        path = Path(config.token_file)
        try:
            token = path.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise FiloError(f"--token_file {path}: cannot read it ({type(err).__name__}); "
                            "write the token on its first line") from None
        if not token or len(token[0].strip()) < 16:
            raise FiloError(f"--token_file {path}: the token on its first line must have at "
                            "least 16 characters (e.g. `python -c 'import secrets; "
                            "print(secrets.token_urlsafe(32))'`)")
        return token[0].strip()
    value = env.get(TOKEN_ENV, "").strip()
    if value and len(value) < 16:
        raise FiloError(f"${TOKEN_ENV} must have at least 16 characters")
    return value or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Fail before loading any model when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise FiloError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose "
                            "another --port or stop the process using it") from None


def default_out_dir() -> Path:
    return Path(os.environ.get("RESULTS_DIR") or "outputs/results") / "serve"


def prepare(args: argparse.Namespace, pipeline_factory=None):
    """(app, service config): everything ``main`` does before the server starts."""
    from filo.fileio import check_writable_dir
    from filo.pipeline import PipelineConfig, build_pipeline
    from filo.service.app import create_app
    from filo.service.engine import Engine
    from filo.settings import from_args

    service = from_args(ServiceConfig, args)
    config = from_args(PipelineConfig, args)
    token = read_token(service)
    if not is_loopback(service.host) and token is None:
        print(f"[filo] warning: binding {service.host} exposes the service to the network "
              f"without a token; pass --token_file or set ${TOKEN_ENV}", file=sys.stderr)
    out_dir = check_writable_dir(service.out_dir or default_out_dir(), "--out_dir")
    if service.port:
        check_port(service.host, service.port)
    pipeline = (pipeline_factory or build_pipeline)(config)
    if getattr(pipeline, "scores_sets", False):
        raise FiloError("--method musc needs --musc_pool to serve single images (build it with "
                        "`python -m filo.musc pool --class NAME --images DIR --out POOL`)")
    engine = Engine(pipeline, service, out_dir)
    if not engine.class_names():
        raise FiloError("no class can be served: the prompt file and the memory bank share no "
                        "class name")
    import time

    t0 = time.perf_counter()
    n = engine.warmup()  # before the port opens: the first request costs what later ones do
    print(f"[filo] models warmed up on {n} class(es) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return create_app(engine, service, token), service


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    import uvicorn

    from filo.service import heap

    heap.limit_arenas()  # before uvicorn's and the model's threads exist
    app, service = prepare(args)
    shown = f"[{service.host}]" if ":" in service.host else service.host
    print(f"[filo] serving on http://{shown}:{service.port}/ (API: /openapi.json, health: "
          f"/healthz); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=service.host, port=service.port, log_level="info" if args.verbose
                else "warning", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
