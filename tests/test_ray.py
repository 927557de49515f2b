"""Ray, on one local cluster shared by the module (2 CPUs): dq-serve --ray with two replicas,
a replica killed under load; calibration and quality.py's samples on two Ray workers against
one process.

Loopback only. Each test has a timeout: a hang fails instead of stalling CI.
"""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

try:
    import ray
except ImportError:  # the optional extra; the dev extra installs it
    ray = None

pytestmark = pytest.mark.timeout(240)
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install -e '.[ray]'")

IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module; gone (no Ray process left) after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(cluster, tiny_export, tmp_path_factory):
    """``dq-serve EXPORT --ray --replicas 2`` joined to the module's cluster."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("ray-serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.server_cli", str(tiny_export), "--ray",
             "--ray-address", cluster, "--replicas", "2", "--replica-cpus", "0.5",
             "--workers", "1", "--max-queue", "4", "--port", str(port),
             "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline, seen = time.monotonic() + 180, set()
    while time.monotonic() < deadline:  # ready when the proxy routes to both replicas
        assert proc.poll() is None, f"dq-serve --ray exited early:\n{log.read_text()}"
        try:
            health = httpx.get(f"{url}/healthz", timeout=2)
            if health.status_code == 200:
                seen.add(health.headers["x-served-by"])
                if len(seen) == 2:
                    break
                continue
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"dq-serve --ray did not become healthy:\n{log.read_text()}")
    yield url, proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def replicas() -> set[str]:
    """The actor names of dq-serve's live replicas (what X-Served-By says)."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::dq-serve#")}


def burst(url: str, count: int, steps: int) -> list[httpx.Response]:
    def post(i):
        return httpx.post(f"{url}{IMAGES}", json={"prompt": "a digit 5", "steps": steps,
                                                  "scheduler": "ddim", "seed": i}, timeout=90)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(post, range(count)))


def answered(response: httpx.Response) -> bool:
    """An image, or an error that says why (JSON from dq-serve, or Serve's own text)."""
    if response.status_code == 200:
        return len(base64.b64decode(response.json()["data"][0]["b64_json"])) > 0
    return response.status_code in (429, 500, 502, 503) and response.text.strip() != ""


@needs_ray
def test_two_replicas_share_16_concurrent_requests(ray_server):
    url, _, _ = ray_server
    responses = burst(url, 16, steps=20)
    assert all(answered(r) for r in responses), [(r.status_code, r.text) for r in responses]
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) >= 8, [r.status_code for r in responses]  # 2 replicas x a queue of 4
    served_by = {r.headers["x-served-by"] for r in ok}
    print(f"\n16 concurrent requests: statuses {dict(Counter(r.status_code for r in responses))}"
          f", images per replica {dict(Counter(r.headers['x-served-by'] for r in ok))}")
    assert served_by == replicas(), served_by  # both replicas, named as Ray names them
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "queue_full" and "x-served-by" in r.headers


@needs_ray
def test_a_killed_replica_is_replaced_and_no_request_hangs(ray_server):
    url, proc, log = ray_server
    before = replicas()
    victim = sorted(before)[0]
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, url, 12, 60)
        time.sleep(1.0)  # requests in flight on both replicas
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        responses = load.result(timeout=120)  # every request answered: none hangs
    # the requests in flight on the victim get Serve's 500; the survivor's are untouched
    assert sum(r.status_code == 500 for r in responses) <= 4
    assert all(answered(r) for r in responses), [(r.status_code, r.text) for r in responses]
    assert any(r.status_code == 200 for r in responses)
    killed_at, deadline = time.monotonic(), time.monotonic() + 90
    while time.monotonic() < deadline and (len(replicas()) < 2 or victim in replicas()):
        time.sleep(0.5)
    after = replicas()
    print(f"\n12 requests, a replica killed: statuses "
          f"{dict(Counter(r.status_code for r in responses))}; replaced within "
          f"{time.monotonic() - killed_at:.1f} s of the requests' end")
    assert len(after) == 2 and victim not in after, after  # Serve started a new one
    fresh = {httpx.get(f"{url}/healthz", timeout=10).headers["x-served-by"] for _ in range(20)}
    assert fresh <= after
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert not replicas()  # the application was deleted


@needs_ray
def test_calibration_on_two_ray_workers_is_bit_identical_to_the_sequential_run(cluster,
                                                                             tmp_path):
    """Two batches on the module's 2-CPU cluster (its replicas are gone by now): the merged
    statistics and the cached UNet inputs equal the sequential run's, bit for bit."""
    from calibration.collect import CalibrationSettings, collect, load_trajectories
    from dq_export.loading import load_components

    tiny = load_components("tiny-sd", "random", seed=0)
    settings = CalibrationSettings(scheduler="ddim", steps=2, num_prompts=2, batch_size=1)
    prompts = ["a handwritten digit 1", "a red 4"]
    here, _ = collect(tiny, settings, prompts, 64, tmp_path / "here", progress=False)
    on_ray, _ = collect(tiny, settings, prompts, 64, tmp_path / "ray", progress=False,
                        ray="auto")
    assert on_ray.keys == here.keys and here.steps_seen().all()
    for name in ("pos", "neg", "zeros", "min", "max"):
        np.testing.assert_array_equal(getattr(on_ray, name), getattr(here, name), err_msg=name)
    batches = [load_trajectories(tmp_path / d) for d in ("here", "ray")]
    assert len(batches[0]) == len(batches[1]) == 2
    for mine, theirs in zip(*batches):
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)


@needs_ray
def test_digits_sharded_over_ray_are_the_images_of_one_process(cluster, tiny_export):
    """benchmarks/quality.py --ray: seeds split over two tasks give the same pixels."""
    from deploy import Pipeline
    from dq_export.evaluation.reference.evaluate import generate_digits, generate_digits_on_ray

    pipe = Pipeline.load(tiny_export, batch_size=10, verify=False)
    here, labels = generate_digits(pipe, range(3), steps=2, scheduler="ddim")
    there, ray_labels = generate_digits_on_ray(tiny_export, range(3), steps=2, scheduler="ddim",
                                               ov_config=pipe.ov_config)
    assert len(there) == len(here) == 30 and np.array_equal(labels, ray_labels)
    for mine, theirs in zip(here, there):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


@pytest.mark.parametrize("module, args", [
    ("deploy.server_cli", ["EXPORT", "--ray"]),
    ("dq_export.cli", ["--bits", "w8a8", "--ray", "auto"]),
])
def test_a_ray_flag_without_ray_is_one_line_exit_2(module, args):
    code = (f"import sys; sys.modules['ray'] = None; from {module} import main; "
            f"sys.exit(main({args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ray needs Ray, which is not installed: pip install -e " \
        "'.[ray]'" in lines[0], proc.stderr


@needs_ray
def test_ray_serve_on_a_bad_folder_fails_before_reaching_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deploy.server_cli", str(tmp_path), "--ray",
                           "--ray-address", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1 and "is not a dq-export folder" in proc.stderr


@needs_ray
def test_dq_export_ray_on_a_recipe_without_calibration_is_a_user_error(capsys):
    from dq_export.cli import main

    assert main(["--bits", "fp32", "--ray", "auto"]) == 2
    assert "--ray runs the calibration batches, and this recipe (fp32" in capsys.readouterr().err
