"""Bounded load test of dq-serve: requests/s and latency percentiles at a few concurrency levels.

    python benchmarks/load_test.py --export exports/tiny-sd-fp32        # starts a server
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY

Each level sends a fixed number of requests (``--requests``) from that many client threads,
and stops issuing new ones after ``--max-seconds``: the run always ends. Prints a table and
writes the figures as JSON under ``--results`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def post(url: str, body: dict, api_key: str | None, timeout: float) -> tuple[int, float]:
    """One request: (HTTP status or 0 for a transport error, seconds)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return status, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def step_seconds(base: str, api_key: str | None) -> tuple[float, float]:
    """(sum, count) of the server's per-step histogram, to report its mean step time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{base}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                  if line.startswith("dq_serve_step_seconds_"))
    return float(values.get("dq_serve_step_seconds_sum", 0)), \
        float(values.get("dq_serve_step_seconds_count", 0))


def run_level(url: str, body: dict, concurrency: int, requests: int, max_seconds: float,
              api_key: str | None, timeout: float, base: str) -> dict:
    lock = threading.Lock()
    remaining = [requests]
    records: list[tuple[int, float]] = []
    stop_at = time.monotonic() + max_seconds

    def client() -> None:
        while True:
            with lock:
                if remaining[0] == 0 or time.monotonic() > stop_at:
                    return
                remaining[0] -= 1
            record = post(url, body, api_key, timeout)
            with lock:
                records.append(record)

    steps_before = step_seconds(base, api_key)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    wall = time.perf_counter() - start
    steps_after = step_seconds(base, api_key)
    ok = [seconds for status, seconds in records if status == 200]
    statuses: dict[str, int] = {}
    for status, _ in records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    steps = steps_after[1] - steps_before[1]
    return {"concurrency": concurrency, "sent": len(records), "ok": len(ok), "statuses": statuses,
            "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
            "p50_s": percentile(ok, 50), "p90_s": percentile(ok, 90), "p99_s": percentile(ok, 99),
            "server_step_mean_s": (steps_after[0] - steps_before[0]) / steps if steps else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export_dir: Path, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.server_cli", str(export_dir), "--port",
                             str(port), "--max-queue", str(max_queue), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_test: error: dq-serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit("load_test: error: dq-serve did not become healthy in 300 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running dq-serve, e.g. http://127.0.0.1:8000")
    target.add_argument("--export", type=Path, help="start dq-serve on this export folder")
    p.add_argument("--api-key", default=os.environ.get("DQ_SERVE_API_KEY"))
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-seconds", type=float, default=120, help="per level; then no new ones")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="dpm++")
    p.add_argument("--prompt", default="a handwritten digit 7")
    p.add_argument("--timeout", type=float, default=600, help="per request, client side")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    proc = None
    if args.export:
        proc, base = start_server(args.export, max_queue=max(levels))
    else:
        base = args.url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as response:
            health = json.load(response)
        url = f"{base}/generate"
        body = {"prompt": args.prompt, "steps": args.steps, "scheduler": args.scheduler,
                "seed": 0}
        post(url, body, args.api_key, args.timeout)  # warm-up, not counted
        results = [run_level(url, body, c, args.requests, args.max_seconds, args.api_key,
                             args.timeout, base) for c in levels]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"dq-serve {health['model']} {health['bits']} {health['size']}, POST /generate, "
          f"{args.steps} {args.scheduler} steps, {args.requests} requests per level")
    print("| clients | ok / sent | other statuses | req/s | p50 ms | p90 ms | p99 ms | "
          "server step ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        other = {k: v for k, v in r["statuses"].items() if k != "200"} or "-"

        def ms(v):
            return "-" if v is None else f"{v * 1000:.1f}"

        print(f"| {r['concurrency']} | {r['ok']} / {r['sent']} | {other} | "
              f"{r['requests_per_s']:.2f} | {ms(r['p50_s'])} | {ms(r['p90_s'])} | "
              f"{ms(r['p99_s'])} | {ms(r['server_step_mean_s'])} |")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"load-{health['model']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "server": health, "endpoint": "/generate", "body": body, "requests_per_level":
        args.requests, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "processor": platform.processor()},
        "levels": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
