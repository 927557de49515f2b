"""dq-serve on Ray Serve: replicas of one export behind Serve's HTTP proxy, the same API.

Each replica is a Ray actor that loads the export once, as dq-serve does (hint, workers,
warm-up), and serves ``create_app``'s routes through Serve's FastAPI ingress. The app is
built inside the replica, after the Pipeline (a late-bound ingress), and every response
names its replica in ``X-Served-By``. Serve routes each request to a replica with room,
replaces a replica whose actor dies, and can scale the count on ongoing requests.

    dq-serve EXPORT --ray --replicas 2                  # joins `ray start`'s cluster, or a new one
    serve run deploy.ray_serve:app_builder export_dir=EXPORT replicas=1:4
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path

from ray import serve

from deploy.server_cli import load_pipeline, parse_args, settings_from_args, warn_if_open

APP_NAME = "dq-serve"
CONTROL_SLOTS = 2  # ongoing requests a replica takes beyond its queue: /healthz, /metrics


@serve.deployment
@serve.ingress()
class DiffusionReplica:
    """One Pipeline (and its workers) with dq-serve's app in front of it."""

    def __init__(self, export_dir: str, settings, workers: int | None, verify: bool):
        from deploy.server import create_app

        pipeline, workers = load_pipeline(Path(export_dir), workers, settings.max_queue, verify)
        self._app = create_app(pipeline, dataclasses.replace(settings, workers=workers))
        name = serve.get_replica_context().replica_id.to_full_id_str()
        self._app.add_middleware(ServedBy, name=name)

    def __serve_build_asgi_app__(self):
        return self._app


class ServedBy:
    """ASGI middleware: an ``X-Served-By`` header on every response, naming the replica."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (b"x-served-by", name.encode())

    async def __call__(self, scope, receive, send):
        async def send_named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_named if scope["type"] == "http" else send)


def application(args):
    """The Serve application for dq-serve's parsed arguments (``--replicas``: a fixed count,
    or MIN:MAX autoscaled to keep about ``--workers`` requests ongoing per replica)."""
    low, high = args.replicas or (1, 1)
    settings = settings_from_args(args, workers=1)  # each replica sets its own count
    options = {"max_ongoing_requests": args.max_queue + CONTROL_SLOTS,
               # held in the proxy while every replica is at its limit; more get 503
               "max_queued_requests": args.max_queue * high,
               "graceful_shutdown_timeout_s": args.timeout,  # admitted requests finish
               "ray_actor_options": {"num_cpus": args.replica_cpus or 1.0}}
    if low == high:
        options["num_replicas"] = low
    else:
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": args.workers or 2}
    return DiffusionReplica.options(**options).bind(str(args.export_dir), settings,
                                                    args.workers, not args.no_verify)


def app_builder(options: dict):
    """``serve run deploy.ray_serve:app_builder export_dir=DIR [key=value ...]``: the keys are
    dq-serve's options (replicas=2, workers=1, max_queue=8, api_key=..., ...)."""
    options = dict(options)
    argv = [str(options.pop("export_dir", "")), "--ray"]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    return application(parse_args(argv))


def serve_on_ray(args) -> int:
    """``dq-serve --ray``: deploy, serve on --host/--port until SIGTERM or Ctrl-C, then
    delete the application (its replicas finish what they admitted) and disconnect."""
    from dq_export.errors import UserError
    from dq_export.manifest import read_manifest
    from dq_export.ray_cluster import connect

    read_manifest(Path(args.export_dir), verify=False)  # a bad folder fails here, not in Ray
    app = application(args)
    ray = connect(args.ray_address, "--ray")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica's constructor failed, several times
            raise UserError(f"the replicas did not start ({str(e).splitlines()[0]}): see the "
                            "replica logs, under /tmp/ray/session_latest/logs/serve/ on "
                            "their nodes") from None
        warn_if_open(args)
        logging.info("serving %s on Ray at http://%s:%d with %s replica(s)", args.export_dir,
                     args.host, args.port, args.replicas)
        stop.wait()
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    return 0
