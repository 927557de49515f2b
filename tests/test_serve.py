"""dq-serve as a user runs it: a real server process on a loopback port, spoken to over HTTP.

Two servers on the tiny-sd export: one with an API key and a queue of 4 (inputs, load,
metrics), one with a 3 s timeout (timeouts, graceful shutdown). Plus the command's own
errors, and docs/serving.md's embedding example (create_app mounted in another ASGI app).
"""

from __future__ import annotations

import base64
import io
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGES = "/v1/images/generations"


class Server:
    """``python -m deploy.server_cli DIR ...`` on a free loopback port, ready when /healthz is."""

    def __init__(self, export_dir, log_path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy.server_cli", str(export_dir),
                                      "--port", str(port), "--log-level", "warning", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not become healthy in 120 s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    srv = Server(tiny_export, tmp_path_factory.mktemp("serve") / "server.log",
                 "--api-key", KEY, "--max-queue", "4", "--timeout", "120", "--max-n", "3",
                 "--workers", "1")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def metrics(client) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (64, 64)
    return np.asarray(image)


def assert_error(response, status: int, expected: str, kind: str = "invalid_request_error"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert expected in error["message"] and error["type"] == kind, error
    assert "\n" not in error["message"]


def test_openai_request_gives_n_images_and_generate_gives_the_same_png(client):
    response = client.post(IMAGES, json={"prompt": "a digit 7", "n": 2, "size": "64x64",
                                         "response_format": "b64_json", "steps": 3, "seed": 5,
                                         "scheduler": "ddim", "negative_prompt": "blurry"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert abs(body["created"] - time.time()) < 60 and len(body["data"]) == 2
    first, second = (png(base64.b64decode(d["b64_json"])) for d in body["data"])
    assert [d["seed"] for d in body["data"]] == [5, 6] and not np.array_equal(first, second)
    direct = client.post("/generate", json={"prompt": "a digit 7", "steps": 3, "seed": 5,
                                            "scheduler": "ddim", "negative_prompt": "blurry"})
    assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
    assert direct.headers["x-seed"] == "5"
    assert np.array_equal(png(direct.content), first)


GOOD = {"prompt": "a digit 3", "steps": 2}


@pytest.mark.parametrize("body, status, expected", [
    ({"prompt": ""}, 400, "prompt must not be empty"),
    ({"prompt": "   "}, 400, "prompt must not be empty"),
    ({"steps": 2}, 400, "prompt is required"),
    ({"prompt": "x" * 1001}, 400, "prompt is 1001 characters, the limit is 1000"),
    ({**GOOD, "negative_prompt": "x" * 1001}, 400, "negative_prompt is 1001 characters"),
    ({**GOOD, "steps": 0}, 400, "steps: input should be greater than or equal to 1"),
    ({**GOOD, "steps": 151}, 400, "steps: input should be less than or equal to 150"),
    ({**GOOD, "steps": "4"}, 400, "steps: input should be a valid integer"),
    ({**GOOD, "steps": 2.5}, 400, "steps: input should be a valid integer"),
    ({**GOOD, "size": "128x128"}, 400, "size 128x128 is not available: this export was "
                                       "compiled for 64x64"),
    ({**GOOD, "size": "large"}, 400, "size must look like '64x64'"),
    ({**GOOD, "guidance": 51}, 400, "guidance: input should be less than or equal to 50"),
    ({**GOOD, "guidance": -0.5}, 400, "guidance: input should be greater than or equal to 0"),
    ({**GOOD, "n": 4}, 400, "n must be at most 3 images per request, got 4"),
    ({**GOOD, "n": 0}, 400, "n: input should be greater than or equal to 1"),
    ({**GOOD, "seed": -1}, 400, "seed: input should be greater than or equal to 0"),
    ({**GOOD, "scheduler": "heun"}, 400, "unknown scheduler 'heun'"),
    ({**GOOD, "response_format": "url"}, 400, "response_format: input should be 'b64_json'"),
    ({**GOOD, "stepz": 3}, 400, "unknown field 'stepz'"),
    ([GOOD], 400, "request body must be a JSON object, got list"),
])
def test_bad_fields_are_400_with_one_line(client, body, status, expected):
    assert_error(client.post(IMAGES, json=body), status, expected)


@pytest.mark.parametrize("content, headers, status, expected", [
    (b'{"prompt": "x",', {"content-type": "application/json"}, 400, "not valid JSON"),
    (b'{"prompt": "x", "guidance": NaN}', {"content-type": "application/json"}, 400,
     "guidance: input should be a finite number"),
    (b"\xff\xfe", {"content-type": "application/json"}, 400, "not valid JSON"),
    (b'{"prompt": "x"}', {"content-type": "text/plain"}, 415,
     "content type must be application/json, got text/plain"),
    (b'{"prompt": "x"}', {}, 415, "content type must be application/json, got none"),
    (b'{"prompt": "' + b"x" * 70_000 + b'"}', {"content-type": "application/json"}, 413,
     "request body is larger than 65536 bytes"),
])
def test_malformed_bodies(client, content, headers, status, expected):
    for path in (IMAGES, "/generate"):
        assert_error(client.post(path, content=content, headers=headers), status, expected)


def test_chunked_body_over_the_limit_is_413(client):
    chunks = iter([b'{"prompt": "', b"x" * 40_000, b"x" * 40_000, b'"}'])  # no Content-Length
    assert_error(client.post("/generate", content=chunks,
                             headers={"content-type": "application/json"}), 413,
                 "request body is larger than 65536 bytes")


def test_generate_takes_no_n(client):
    assert_error(client.post("/generate", json={**GOOD, "n": 2}), 400, "unknown field 'n'")


def test_api_key_is_required_except_for_healthz(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        assert_error(httpx.post(f"{server.url}/generate", json=GOOD, headers=headers), 401,
                     "missing or wrong API key", "authentication_error")
        assert httpx.get(f"{server.url}/metrics", headers=headers).status_code == 401
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    ok = httpx.post(f"{server.url}/generate", json=GOOD, headers={"X-API-Key": KEY}, timeout=60)
    assert ok.status_code == 200


def test_unknown_path_and_method_answer_json(client):
    assert_error(client.get("/v2/nothing"), 404, "Not Found")
    assert_error(client.get("/generate"), 405, "Method Not Allowed")


def test_16_concurrent_requests_all_answered_and_counted(server, client):
    """Queue of 4, 16 at once: each gets an image or a 429; none is lost; counts match."""
    steps, follow_up = 40, 2  # DDIM: one UNet call per step (PNDM adds one)
    before = metrics(client)

    def post(_):
        return httpx.post(f"{server.url}{IMAGES}", json={"prompt": "a digit 1", "steps": steps,
                                                               "scheduler": "ddim"},
                          headers=AUTH, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(rejected) == 16, [r.status_code for r in responses]
    assert len(ok) >= 4 and rejected  # the first four always fit; sixteen never do
    for r in ok:
        png(base64.b64decode(r.json()["data"][0]["b64_json"]))
    for r in rejected:
        assert_error(r, 429, "the generation queue is full (4 jobs)", "queue_full")
        assert int(r.headers["retry-after"]) >= 1

    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    alive = client.post("/generate", json={**GOOD, "steps": follow_up, "scheduler": "ddim"})
    assert alive.status_code == 200  # the worker lives on

    after = metrics(client)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    endpoint = f'endpoint="{IMAGES}"'
    assert delta(f"dq_serve_requests_total{{{endpoint},status=\"200\"}}") == len(ok)
    assert delta(f"dq_serve_requests_total{{{endpoint},status=\"429\"}}") == len(rejected)
    assert delta(f"dq_serve_request_seconds_count{{{endpoint}}}") == 16
    assert delta('dq_serve_errors_total{type="queue_full"}') == len(rejected)
    assert delta("dq_serve_images_total") == len(ok) + 1
    assert delta("dq_serve_step_seconds_count") == len(ok) * steps + follow_up
    assert delta("dq_serve_generation_seconds_count") == len(ok) + 1
    assert after["dq_serve_queue_depth"] == 0 and after["dq_serve_queue_capacity"] == 4


def test_metrics_count_errors_by_type_and_status(client):
    before = metrics(client)
    for _ in range(3):
        client.post(IMAGES, json={"prompt": ""})
    client.post(IMAGES, content=b"{", headers={"content-type": "application/json"})
    after = metrics(client)
    key = f'dq_serve_requests_total{{endpoint="{IMAGES}",status="400"}}'
    assert after[key] - before.get(key, 0) == 4
    key = 'dq_serve_errors_total{type="invalid_request_error"}'
    assert after[key] - before.get(key, 0) == 4
    histogram = [k for k in after if k.startswith("dq_serve_request_seconds_bucket")]
    assert any('le="+Inf"' in k for k in histogram)


@pytest.fixture
def short_timeout_server(tiny_export, tmp_path):
    srv = Server(tiny_export, tmp_path / "server.log", "--timeout", "3", "--max-n", "8")
    yield srv
    srv.stop()


def test_timeout_is_504_and_the_worker_recovers(short_timeout_server):
    url = short_timeout_server.url
    start = time.monotonic()
    # 8 images x 150 steps: far more than 3 s even on a fast CPU
    response = httpx.post(f"{url}{IMAGES}", json={"prompt": "x", "n": 8, "steps": 150},
                          timeout=60)
    assert_error(response, 504, "generation did not finish within 3 s", "timeout")
    assert time.monotonic() - start < 10
    wait_for_depth(url, 0)  # the running image finishes, the other seven are skipped
    assert httpx.post(f"{url}/generate", json=GOOD, timeout=60).status_code == 200


def test_sigterm_finishes_in_flight_requests(short_timeout_server):
    url, proc = short_timeout_server.url, short_timeout_server.proc
    results = {}

    def post(steps):
        results[steps] = httpx.post(f"{url}/generate", json={"prompt": "x", "steps": steps},
                                    timeout=60)

    threads = [threading.Thread(target=post, args=(s,)) for s in (60, 30)]
    for t in threads:
        t.start()
    wait_for_depth(url, 2)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    # uvicorn re-raises the signal once it has drained, so the exit status is SIGTERM's
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert "Traceback" not in short_timeout_server.log()
    for steps in (60, 30):
        assert results[steps].status_code == 200
        png(results[steps].content)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_two_workers_serve_in_parallel_count_right_and_drain(tiny_export, tmp_path):
    """--workers 2: two jobs run at once, every metric adds up, and SIGTERM answers all."""
    srv = Server(tiny_export, tmp_path / "server.log", "--workers", "2", "--max-queue", "4")
    steps, url = 40, srv.url
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            before = metrics(client)
            assert before["dq_serve_workers"] == 2

            def post(_):
                return client.post("/generate", json={"prompt": "a digit 4", "steps": steps,
                                                      "scheduler": "ddim"})

            start = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                pending = pool.map(post, range(4))
                wait_for_depth(url, 2, metric="dq_serve_jobs_running")  # both at once
                responses = list(pending)
            wall = time.monotonic() - start
            assert [r.status_code for r in responses] == [200] * 4
            after = metrics(client)

        def delta(name):
            return after.get(name, 0) - before.get(name, 0)

        assert delta('dq_serve_requests_total{endpoint="/generate",status="200"}') == 4
        assert delta("dq_serve_images_total") == 4
        assert delta("dq_serve_generation_seconds_count") == 4
        assert delta("dq_serve_step_seconds_count") == 4 * steps
        busy = [delta(f'dq_serve_worker_busy_seconds_total{{worker="{i}"}}') for i in (0, 1)]
        assert min(busy) > 0  # both workers served
        assert delta("dq_serve_generation_seconds_sum") <= sum(busy) <= 2 * wall
        assert sum(busy) > 1.3 * wall  # overlapping jobs: more busy time than wall time
        assert after["dq_serve_jobs_running"] == 0 and after["dq_serve_queue_depth"] == 0

        results = {}

        def post_one(steps):
            results[steps] = httpx.post(f"{url}/generate", json={"prompt": "x", "steps": steps},
                                        timeout=60)

        threads = [threading.Thread(target=post_one, args=(s,)) for s in (40, 30, 20)]
        for t in threads:
            t.start()
        wait_for_depth(url, 3)  # two running, one waiting
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert srv.proc.wait(timeout=30) == -signal.SIGTERM
        assert [results[s].status_code for s in (40, 30, 20)] == [200] * 3
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def wait_for_depth(url: str, depth: int, seconds: float = 60,
                   metric: str = "dq_serve_queue_depth") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if re.search(rf"^{metric} {depth}$", text, re.M):
            return
        time.sleep(0.02)
    pytest.fail(f"{metric} never reached {depth}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.server_cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("make_args, expected", [
    (lambda tmp: [str(tmp / "missing")], "is not a dq-export folder"),
    (lambda tmp: [str(tmp)], "is not a dq-export folder"),
    (lambda tmp: [str(tmp), "--port", "70000"], "--port must be in [0, 65535]"),
    (lambda tmp: [str(tmp), "--max-queue", "0"], "--max-queue must be positive"),
    (lambda tmp: [str(tmp), "--workers", "9"], "--workers must be in [1, --max-queue=8]"),
    (lambda tmp: [str(tmp), "--replicas", "2"], "--replicas need --ray"),
    (lambda tmp: [str(tmp), "--ray", "--replicas", "3:1"], "needs 0 <= MIN <= MAX"),
])
def test_bad_command_line_is_one_line_exit_2(tmp_path, make_args, expected):
    proc = run_cli(*make_args(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], proc.stderr


def test_help_loads_nothing_heavy():
    code = ("import sys; from deploy import server_cli; server_cli.build_parser().format_help(); "
            "heavy = {'fastapi', 'uvicorn', 'openvino', 'torch', 'diffusers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert "127.0.0.1" in run_cli("--help").stdout


def test_create_app_mounts_inside_another_app(tiny_pipeline):
    """docs/serving.md's embedding example: the generation API under a prefix of an existing app."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deploy.server import ServerSettings, create_app

    app = FastAPI()

    @app.get("/")
    def home():
        return {"app": "mine"}

    app.mount("/diffusion", create_app(tiny_pipeline, ServerSettings(max_queue=2, timeout=60)))
    with TestClient(app) as client:
        assert client.get("/").json() == {"app": "mine"}
        response = client.post("/diffusion/generate", json={**GOOD, "seed": 1})
        assert response.status_code == 200
        png(response.content)
        assert_error(client.post("/diffusion/generate", json={"prompt": ""}), 400,
                     "prompt must not be empty")
        text = client.get("/diffusion/metrics").text
    assert 'dq_serve_requests_total{endpoint="/generate",status="200"} 1' in text
    assert 'dq_serve_requests_total{endpoint="/generate",status="400"} 1' in text


class StubPipeline:
    """Stands in for Pipeline where a real one cannot be made to fail on demand."""

    image_size = (64, 64)
    conditional = True  # a text-to-image export: the only kind dq-serve serves
    manifest = {"model": {"name": "stub"}, "recipe": {"bits": "fp32"}}
    root = None  # no files on disk to watch
    cache = None  # no feature-cache graphs

    def __init__(self, *failures: Exception):
        self.failures = list(failures)

    def generate(self, prompt, **kwargs):
        from deploy.pipeline import GenerationResult

        if self.failures:
            raise self.failures.pop(0)
        return GenerationResult([Image.new("RGB", (64, 64), "white")], [0.01] * kwargs["steps"])


def test_pipeline_failures_are_answered_and_the_worker_carries_on():
    from fastapi.testclient import TestClient

    from deploy.server import create_app
    from dq_export.errors import UserError

    app = create_app(StubPipeline(UserError("guidance must be in [0, 50]"), RuntimeError("boom")))
    with TestClient(app) as client:
        assert_error(client.post("/generate", json=GOOD), 400, "guidance must be in [0, 50]")
        assert_error(client.post("/generate", json=GOOD), 500,
                     "generation failed: RuntimeError: boom", "server_error")
        assert client.post("/generate", json=GOOD).status_code == 200
        text = client.get("/metrics").text
    assert 'dq_serve_errors_total{type="server_error"} 1' in text
    assert "dq_serve_images_total 1" in text


def test_a_bug_in_a_handler_is_still_a_json_500():
    from fastapi.testclient import TestClient

    from deploy.server import create_app

    pipeline = StubPipeline()
    pipeline.manifest = {}  # /healthz reads the model name from it: KeyError
    with TestClient(create_app(pipeline), raise_server_exceptions=False) as client:
        assert_error(client.get("/healthz"), 500, "internal error: KeyError", "server_error")
        assert 'dq_serve_requests_total{endpoint="/healthz",status="500"} 1' in \
            client.get("/metrics").text
