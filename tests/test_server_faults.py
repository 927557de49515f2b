"""dq-serve under faults: its export changed on disk, clients that hang up, and a seeded
fuzzer over the request schema. The server answers 503 rather than from a broken model,
never 5xx to bad input, and stays healthy. (A generation that raises is
test_serve.py::test_pipeline_failures_are_answered_and_the_worker_carries_on.)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from deploy import Pipeline
from deploy.server import ServerSettings, create_app

GOOD = {"prompt": "a handwritten digit 4", "steps": 1}
FUZZ_REQUESTS = 200


def change_weights(root):
    with open(root / "unet" / "openvino_model.bin", "ab") as f:
        f.write(b"\0")
    return r"unet/openvino_model\.bin changed on disk after the server loaded it"


def remove_tokenizer(root):
    shutil.rmtree(root / "tokenizer")
    return r"tokenizer/\S+ was removed from the export after the server loaded it"


@pytest.mark.parametrize("fault", [change_weights, remove_tokenizer])
def test_an_export_changed_under_the_server_is_503_not_a_crash(fault, tiny_export, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    with TestClient(create_app(Pipeline.load(export))) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.post("/generate", json=GOOD).status_code == 200
        problem = fault(export)
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert re.fullmatch(problem, health.json()["problem"])
        for path in ("/generate", "/v1/images/generations"):
            answer = client.post(path, json=GOOD)
            assert answer.status_code == 503
            error = answer.json()["error"]
            assert error["type"] == "unavailable"
            assert re.fullmatch(f"{problem}: restart the server on a good export",
                                error["message"])
        assert client.post("/generate", json={"prompt": ""}).status_code == 400
        assert 'dq_serve_errors_total{type="unavailable"} 2' in client.get("/metrics").text


@contextmanager
def live_server(app):
    """uvicorn serving ``app`` from a thread of this process, on a free loopback port."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def depth(url: str) -> int:
    return httpx.get(f"{url}/healthz", timeout=10).json()["queue_depth"]


def wait_for_depth(url: str, wanted: int) -> None:
    deadline = time.monotonic() + 120
    while depth(url) != wanted:
        assert time.monotonic() < deadline, f"queue depth never reached {wanted}"
        time.sleep(0.02)


def test_clients_hanging_up_mid_request_leave_the_queue_count_right(tiny_pipeline):
    """Two clients send a long request (one running, one waiting) and hang up: both jobs
    finish, the queue drains to 0, and both slots of the queue are free again."""
    app = create_app(tiny_pipeline, ServerSettings(max_queue=2, timeout=120))
    with live_server(app) as url:
        body = json.dumps({"prompt": "a digit 8", "steps": 40}).encode()
        request = (b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        port = int(url.rsplit(":", 1)[1])
        hanging = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for sock in hanging:
            sock.sendall(request)
        wait_for_depth(url, 2)
        for sock in hanging:
            sock.close()
        wait_for_depth(url, 0)
        with ThreadPoolExecutor(2) as pool:  # a slot leaked would make one of these a 429
            answers = list(pool.map(lambda _: httpx.post(f"{url}/generate", json=GOOD,
                                                         timeout=120), range(2)))
        assert [a.status_code for a in answers] == [200, 200]
        assert depth(url) == 0


def bad_value(rng: random.Random, depth: int = 0):
    """A value of the wrong type, a huge number, odd unicode, or a nested object."""
    kind = rng.choice(["type", "number", "unicode", "nested"])
    if kind == "type":
        return rng.choice([None, True, False, [], {}, "7", 7, 0.5, -1, "", " "])
    if kind == "number":
        return rng.choice([10**30, -10**30, 2**63, 2**64 + 1, 1e308, -1e308, float("inf"),
                           float("nan"), 1e-320, 2**31, 2**32])
    if kind == "unicode":
        return rng.choice(["\u202e7 tigid", "\U0001f47e" * 300, "\x00", "\ud800", "e\u0301",
                           "\ufeff", "\u0000" * 2000, "Ω" * 999, "64x64\x00", "𝟔𝟒x𝟔𝟒"])
    if depth < 30 and rng.random() < 0.9:
        return {rng.choice(["a", "prompt", "steps"]): [bad_value(rng, depth + 1)]}
    return {}


UNICODE = ["\u202e7 tigid", "\U0001f47e" * 300, "\ud800", "e\u0301", "\ufeff", "Ω" * 1000]
EDGES = {  # valid values at the schema's edges: these reach the model
    "prompt": UNICODE, "negative_prompt": ["", *UNICODE], "size": ["64x64"],
    "steps": [1, 2, 3], "guidance": [0, 50, 1e-9], "seed": [0, 2**32 - 1],
    "scheduler": ["pndm", "ddim", "dpm++", "euler"], "cache": ["off", None], "n": [1, 2],
    "response_format": ["b64_json"], "model": UNICODE, "user": UNICODE}
FIELDS = (*EDGES, "unknown")


def test_a_seeded_fuzzer_gets_only_2xx_and_4xx_and_the_server_stays_healthy(tiny_pipeline):
    rng = random.Random(22)
    app = create_app(tiny_pipeline, ServerSettings(max_queue=4, timeout=120, max_n=2))
    statuses = Counter()
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(FUZZ_REQUESTS):
            body = {**GOOD, "seed": rng.randrange(100)}
            for field in rng.sample(FIELDS, rng.randint(1, 3)):
                edge = field in EDGES and rng.random() < 0.3
                body[field] = rng.choice(EDGES[field]) if edge else bad_value(rng)
            path = rng.choice(["/generate", "/v1/images/generations"])
            answer = client.post(path, content=json.dumps(body),
                                 headers={"content-type": "application/json"})
            statuses[answer.status_code] += 1
            assert 200 <= answer.status_code < 300 or 400 <= answer.status_code < 500, \
                (answer.status_code, body, answer.text)
            if answer.status_code >= 400:
                assert "\n" not in answer.json()["error"]["message"]
        print(f"\nfuzzer: {FUZZ_REQUESTS} requests, status codes {dict(sorted(statuses.items()))}")
        assert sum(statuses.values()) == FUZZ_REQUESTS
        assert statuses[200] >= 10 and statuses[400] >= 100  # it reached the model, and failed
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["queue_depth"] == 0
        assert client.post("/generate", json=GOOD).status_code == 200
