"""``dq-serve DIR``: serve an export over HTTP (OpenAI images API, PNG, health, metrics).

Only argparse is imported up front, so ``--help`` and argument errors are instant; the
model, FastAPI and uvicorn load after the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dq-serve", description="Serve a dq-export folder over HTTP: POST "
        "/v1/images/generations, POST /generate (PNG), GET /healthz, GET /metrics.")
    p.add_argument("export_dir", type=Path, help="folder written by dq-export")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DQ_SERVE_API_KEY"),
                   help="require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY') "
                        "on every endpoint but /healthz (default: $DQ_SERVE_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="generation jobs admitted at once, running included; more get 429")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may wait and run before it gets 504")
    p.add_argument("--max-n", type=int, default=4, help="most images in one request")
    p.add_argument("--workers", type=int, default=None,
                   help="generation threads, each on its own sibling of the Pipeline (one copy "
                        "of the weights) under OpenVINO's THROUGHPUT hint (default: the "
                        "export's optimal number of infer requests on this CPU, at most "
                        "--max-queue); 1: one at a time under the LATENCY hint")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024,
                   help="larger request bodies get 413")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking file hashes against the manifest (faster start)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("Ray Serve (replicas of the export on one machine or a cluster)")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: replicas, each loading the export, behind "
                        "Serve's HTTP proxy on --host/--port (needs pip install -e '.[ray]')")
    r.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join, e.g. ray://HEAD:10001 (default: the one "
                        "`ray start` runs on this machine or $RAY_ADDRESS, else a new local "
                        "one)")
    r.add_argument("--replicas", type=replica_bounds, default=None,
                   help="N replicas, or MIN:MAX to autoscale on ongoing requests (default 1)")
    r.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs Ray reserves for each replica (default 1)")
    return p


def replica_bounds(text: str) -> tuple[int, int]:
    """``N`` -> (N, N); ``MIN:MAX`` -> the autoscaling bounds."""
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX, got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise argparse.ArgumentTypeError(f"needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return bounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: a bad one exits with argparse's one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_queue", "timeout", "max_n", "max_body_bytes", "replica_cpus"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.workers is not None and not 1 <= args.workers <= args.max_queue:
        parser.error(f"--workers must be in [1, --max-queue={args.max_queue}], got {args.workers}")
    ray_only = [f"--{name.replace('_', '-')}"
                for name in ("ray_address", "replicas", "replica_cpus")
                if getattr(args, name) is not None]
    if ray_only and not args.ray:
        parser.error(f"{' and '.join(ray_only)} need --ray")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="dq-serve: %(levelname)s: %(message)s")
    from dq_export.errors import UserError

    try:
        if args.ray:
            from dq_export.ray_cluster import require_ray

            require_ray()
            from deploy.ray_serve import serve_on_ray

            return serve_on_ray(args)
        pipeline, workers = load_pipeline(args.export_dir, args.workers, args.max_queue,
                                          verify=not args.no_verify)
    except UserError as e:
        print(f"dq-serve: error: {e}", file=sys.stderr)
        return e.exit_code
    return serve(pipeline, args, workers)


def load_pipeline(export_dir: Path, workers: int | None, max_queue: int, verify: bool = True):
    """(the export compiled and warmed up, the number of worker threads). One worker runs
    under the LATENCY hint: each request as fast as it goes. More share the CPU's streams
    under the THROUGHPUT hint; None picks the export's optimal number of infer requests."""
    from deploy.pipeline import Pipeline
    from deploy.server import check_servable

    hint = "LATENCY" if workers == 1 else "THROUGHPUT"
    pipeline = Pipeline.load(export_dir, verify=verify, ov_config={"PERFORMANCE_HINT": hint})
    check_servable(pipeline)
    pipeline.generate("warm-up", steps=1)  # first call imports the sampler stack
    return pipeline, workers or min(pipeline.optimal_requests, max_queue)


def settings_from_args(args, workers: int):
    from deploy.server import ServerSettings

    return ServerSettings(max_queue=args.max_queue, timeout=args.timeout,
                          api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                          max_n=args.max_n, workers=workers)


def serve(pipeline, args, workers: int) -> int:
    import uvicorn

    from deploy.server import create_app

    settings = settings_from_args(args, workers)
    warn_if_open(args)
    height, width = pipeline.image_size
    logging.info("serving %s (%dx%d) on http://%s:%d with %d worker(s)", args.export_dir, width,
                 height, args.host, args.port, workers)
    # uvicorn stops accepting on SIGINT/SIGTERM and lets in-flight requests finish.
    uvicorn.run(create_app(pipeline, settings), host=args.host, port=args.port,
                log_level=args.log_level)
    return 0


def warn_if_open(args) -> None:
    if not args.api_key and not _is_loopback(args.host):
        logging.warning("binding %s without --api-key: anyone who can reach it may generate",
                        args.host)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
