"""``create_app(pipeline, settings)``: the HTTP face of one loaded Pipeline (FastAPI).

The app is self-contained so it can run alone (``dq-serve``) or be mounted inside another
ASGI app: its worker threads start with the app, not in a lifespan hook (mounted apps get no
lifespan events); the lifespan only waits for admitted jobs on shutdown. With
``settings.workers`` N, N threads each run on their own sibling of the Pipeline.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from deploy.health import ExportWatch
from deploy.metrics import STEP_BUCKETS, Registry
from deploy.pipeline import Pipeline
from deploy.schema import ApiError, GenerateRequest, ImagesRequest, parse
from deploy.worker import GenerationQueue, JobTimeout, QueueFull
from dq_export.errors import UserError

log = logging.getLogger("dq-serve")

ENDPOINTS = ("/v1/images/generations", "/generate", "/healthz", "/metrics")


@dataclass
class ServerSettings:
    max_queue: int = 8  # generation jobs admitted at once (waiting + running); more get 429
    timeout: float = 300.0  # seconds from admission to answer; then 504
    api_key: str | None = None  # when set, every endpoint but /healthz needs it
    max_body_bytes: int = 64 * 1024  # larger bodies get 413
    max_n: int = 4  # images per /v1/images/generations request
    max_prompt_chars: int = 1000
    workers: int = 1  # generation threads, each on a Pipeline sibling (load it for THROUGHPUT)


class _Metrics:
    """The server's metric families, in one registry per app."""

    def __init__(self, queue: GenerationQueue):
        self.registry = r = Registry()
        self.requests = r.counter("dq_serve_requests_total", "HTTP requests by endpoint and status",
                                  ("endpoint", "status"))
        self.errors = r.counter("dq_serve_errors_total", "error responses by error type",
                                ("type",))
        self.latency = r.histogram("dq_serve_request_seconds", "HTTP request latency",
                                   ("endpoint",))
        self.images = r.counter("dq_serve_images_total", "images generated and returned")
        self.steps = r.histogram("dq_serve_step_seconds",
                                 "wall time of one sampler step (UNet call + scheduler update)",
                                 buckets=STEP_BUCKETS)
        self.generation = r.histogram("dq_serve_generation_seconds",
                                      "wall time of one image in the worker")
        r.gauge("dq_serve_queue_depth", "generation jobs admitted and not finished",
                lambda: queue.depth)
        r.gauge("dq_serve_queue_capacity", "most generation jobs admitted at once",
                lambda: queue.capacity)
        r.gauge("dq_serve_workers", "generation threads, each on its own Pipeline sibling",
                lambda: len(queue.workers))
        r.gauge("dq_serve_jobs_running", "generation jobs running now (at most one per worker)",
                lambda: queue.running)
        r.counter_read("dq_serve_worker_busy_seconds_total",
                       "wall time each worker has spent running jobs", ("worker",),
                       lambda: {(str(i),): s for i, s in enumerate(queue.busy_seconds)})


class _Instrument:
    """ASGI middleware: counts every response by endpoint and status, and times it."""

    def __init__(self, app, metrics: _Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # when mounted
        endpoint = path if path in ENDPOINTS else "other"
        status = 500  # what the client sees when the app raises before answering
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)


def check_servable(pipeline: Pipeline) -> None:
    """The API (OpenAI images, /generate) is prompts in, images out: text-to-image exports."""
    if not pipeline.conditional:
        raise UserError(f"{pipeline.manifest['model']['name']} is an unconditional export and "
                        "dq-serve serves text-to-image ones (its requests carry a prompt): draw "
                        "its images with dq-generate or deploy.Pipeline")


def create_app(pipeline: Pipeline, settings: ServerSettings | None = None) -> FastAPI:
    check_servable(pipeline)
    settings = settings or ServerSettings()
    if not 1 <= settings.workers <= settings.max_queue:
        raise UserError(f"workers must be in [1, max_queue={settings.max_queue}] (more could "
                        f"never all be busy), got {settings.workers}")
    workers = [pipeline] + [pipeline.sibling() for _ in range(settings.workers - 1)]
    queue = GenerationQueue(settings.max_queue, settings.timeout, workers)
    metrics = _Metrics(queue)
    watch = ExportWatch(pipeline.root, pipeline.manifest.get("files", {}))
    height, width = pipeline.image_size

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="dq-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Instrument, metrics=metrics)

    def error_response(error: ApiError) -> JSONResponse:
        metrics.errors.inc(type=error.kind)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):  # 404, 405: same JSON shape
        return error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_request, error: Exception):  # a bug: still the same JSON shape
        return error_response(ApiError(500, f"internal error: {type(error).__name__}",
                                       "server_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or \
            request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                "or 'X-API-Key: KEY'", "authentication_error")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise _too_large(settings.max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise _too_large(settings.max_body_bytes)
        return bytes(body)

    async def checked(request: Request, model: type[GenerateRequest]) -> GenerateRequest:
        authorize(request)
        raw = await read_body(request)
        req = parse(raw, request.headers.get("content-type"), model,
                    image_size=(height, width), max_prompt_chars=settings.max_prompt_chars,
                    max_n=settings.max_n)
        if req.cache not in (None, "off") and pipeline.cache is None:
            raise ApiError(400, f"cache {req.cache!r}: this export has no cache graphs (export "
                                "it with dq-export --cache), use cache \"off\" or leave it out")
        return req

    def job(req: GenerateRequest, seeds: list[int]):
        def run(worker: Pipeline, deadline: float) -> list[tuple[bytes, dict]]:
            images = []
            for seed in seeds:
                if images and time.monotonic() > deadline:
                    break  # the caller has had its 504; skip the rest of its images
                start = time.perf_counter()
                result = worker.generate(req.prompt, negative_prompt=req.negative_prompt,
                                         steps=req.steps, scheduler=req.scheduler,
                                         guidance=req.guidance, seed=seed, cache=req.cache)
                metrics.generation.observe(time.perf_counter() - start)
                for seconds in result.step_seconds:
                    metrics.steps.observe(seconds)
                images.append((_png(result.images[0]), result.unet_calls))
            return images
        return run

    async def generate(req: GenerateRequest, count: int) -> tuple[list[tuple], list[int]]:
        """[(PNG bytes, UNet calls {"full", "cached"})] and the seeds."""
        first = secrets.randbelow(2**31) if req.seed is None else req.seed
        seeds = [first + i for i in range(count)]
        _check_export(watch)
        try:
            images = await queue.run(job(req, seeds))
        except QueueFull as e:
            raise ApiError(429, f"the generation queue is full ({queue.capacity} jobs): retry "
                                f"after {e.retry_after} s", "queue_full",
                           {"Retry-After": str(e.retry_after)}) from None
        except JobTimeout as e:
            raise ApiError(504, f"{e}: try fewer steps or images", "timeout") from None
        except UserError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:  # the worker thread lives on; this request fails alone
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                           "server_error") from None
        _check_export(watch)  # the files may have changed while the images were made
        metrics.images.inc(len(images))
        return images, seeds

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        req = await checked(request, ImagesRequest)
        images, seeds = await generate(req, req.n)
        data = [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed,
                 "unet_calls": calls} for (png, calls), seed in zip(images, seeds)]
        return {"created": int(time.time()), "data": data}

    @app.post("/generate")
    async def generate_png(request: Request):
        req = await checked(request, GenerateRequest)
        ((png, calls),), (seed,) = await generate(req, 1)
        return Response(png, media_type="image/png",
                        headers={"X-Seed": str(seed),
                                 "X-UNet-Calls": ",".join(f"{k}={v}" for k, v in calls.items())})

    @app.get("/healthz")
    async def healthz():
        problem = watch.problem()
        body = {"status": "ok" if problem is None else "unavailable",
                "model": pipeline.manifest["model"].get("name"),
                "bits": pipeline.manifest["recipe"].get("bits"), "size": f"{width}x{height}",
                "queue_depth": queue.depth, "queue_capacity": queue.capacity}
        if problem is not None:
            return JSONResponse({**body, "problem": problem}, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics_text(request: Request):
        authorize(request)
        return Response(metrics.registry.render(), media_type=Registry.content_type)

    return app


def _check_export(watch: ExportWatch) -> None:
    """503 while the export on disk is not the one loaded: never an answer from a broken
    model (see deploy.health)."""
    problem = watch.problem()
    if problem is not None:
        raise ApiError(503, f"{problem}: restart the server on a good export", "unavailable")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
