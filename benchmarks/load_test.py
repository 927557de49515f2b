"""Bounded load test of dq-serve: images/min and latency percentiles at a few concurrency levels.

    python benchmarks/load_test.py --export exports/tiny-sd-fp32 --workers 1,auto
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY

Each level sends a fixed number of requests (``--requests``, one image each) from that many
client threads, and stops issuing new ones after ``--max-seconds``: the run always ends.
With ``--export`` it starts one server per ``--workers`` setting (``auto``: the server's
default) and measures them in turn at each level, so that a change in the machine's load
during the run hits every setting alike. Prints a table and writes results.json and load.png
(images/min, p50 and p99 against clients) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import figure, machine, markdown_table, save_figure


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
            "images_per_min": 60 * len(ok) / wall if wall else 0.0,
            "p50_s": percentile(ok, 50), "p90_s": percentile(ok, 90), "p99_s": percentile(ok, 99),
            "server_step_mean_s": (steps_after[0] - steps_before[0]) / steps if steps else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export_dir: Path, max_queue: int,
                 workers: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = [] if workers == "auto" else ["--workers", workers]
    proc = subprocess.Popen([sys.executable, "-m", "deploy.server_cli", str(export_dir), "--port",
                             str(port), "--max-queue", str(max_queue), "--log-level", "warning",
                             *extra], stdout=subprocess.DEVNULL)
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


def prepare(base: str, requested: str, args) -> dict:
    """The server at ``base``, warmed up: its health and worker count, levels to come."""
    with urllib.request.urlopen(f"{base}/healthz", timeout=30) as response:
        health = json.load(response)
    post(f"{base}/generate", body(args), args.api_key, args.timeout)  # warm-up, not counted
    return {"requested": requested, "server": health,
            "workers": server_workers(base, args.api_key), "levels": []}


def body(args) -> dict:
    return {"prompt": args.prompt, "steps": args.steps, "scheduler": args.scheduler, "seed": 0}


def server_workers(base: str, api_key: str | None) -> int | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{base}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("dq_serve_workers "):
                return int(float(line.split()[1]))
    return None  # a server from before --workers


def workers_label(config: dict) -> str:
    """The setting asked for, and the worker count the server reported when they differ."""
    requested, workers = config["requested"], config["workers"]
    return requested if requested == str(workers) else f"{requested} ({workers})"


def table(run: dict) -> str:
    def ms(seconds):
        return "-" if seconds is None else f"{seconds * 1000:.0f}"

    rows = []
    for config in run["configs"]:
        for r in config["levels"]:
            other = {k: v for k, v in r["statuses"].items() if k != "200"} or "-"
            rows.append((workers_label(config), r["concurrency"], f"{r['ok']} / {r['sent']}",
                         other, f"{r['images_per_min']:.0f}", ms(r["p50_s"]), ms(r["p90_s"]),
                         ms(r["p99_s"]), f"{r['server_step_mean_s'] * 1000:.1f}"
                         if r["server_step_mean_s"] else "-"))
    head = ("--workers", "clients", "ok / sent", "other statuses", "images/min", "p50 ms",
            "p90 ms", "p99 ms", "server step ms")
    return markdown_table(head, rows)


def chart(run: dict, path: Path) -> None:
    """Images/min, p50 and p99 against clients, one line per workers setting."""
    fig, axes = figure(3)
    for config in run["configs"]:
        levels = config["levels"]
        clients = [r["concurrency"] for r in levels]
        label = f"--workers {workers_label(config)}"
        axes[0].plot(clients, [r["images_per_min"] for r in levels], marker="o", label=label)
        for ax, key in zip(axes[1:], ("p50_s", "p99_s")):
            ax.plot(clients, [r[key] * 1000 if r[key] else None for r in levels], marker="o",
                    label=label)
    for ax, title in zip(axes, ("images/min", "p50 latency ms", "p99 latency ms")):
        ax.set_title(title)
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    save_figure(fig, path, f"dq-serve {run['model']}: POST /generate, {run['body']['steps']} "
                f"{run['body']['scheduler']} steps", fontsize=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running dq-serve, e.g. http://127.0.0.1:8000")
    target.add_argument("--export", type=Path, help="start dq-serve on this export folder")
    p.add_argument("--workers", default="auto",
                   help="with --export: comma-separated dq-serve --workers settings to compare, "
                        "auto for the server's default (default auto)")
    p.add_argument("--api-key", default=os.environ.get("DQ_SERVE_API_KEY"))
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-seconds", type=float, default=120, help="per level; then no new ones")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="dpm++")
    p.add_argument("--prompt", default="a handwritten digit 7")
    p.add_argument("--timeout", type=float, default=600, help="per request, client side")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.json and load.png (default: "
                        "benchmarks/results/load-MODEL-DATE)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = args.workers.split(",") if args.export else ["(running)"]

    procs, bases = [], []
    try:
        for requested in settings:
            if args.export:
                proc, base = start_server(args.export, max(levels), requested)
                procs.append(proc)
            else:
                base = args.url.rstrip("/")
            bases.append(base)
        configs = [prepare(base, requested, args) for base, requested in zip(bases, settings)]
        for concurrency in levels:
            for config, base in zip(configs, bases):  # the idle server waits its turn
                config["levels"].append(run_level(f"{base}/generate", body(args), concurrency,
                                                  args.requests, args.max_seconds,
                                                  args.api_key, args.timeout, base))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)

    health = configs[0]["server"]
    run = {"model": health["model"], "bits": health["bits"], "size": health["size"],
           "endpoint": "/generate", "body": body(args), "requests_per_level": args.requests,
           "command": "python benchmarks/load_test.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine(), "configs": configs}
    print(f"dq-serve {health['model']} {health['bits']} {health['size']}, POST /generate, "
          f"{args.steps} {args.scheduler} steps, {args.requests} requests per level")
    print(table(run))
    out = args.out or (Path(__file__).parent / "results" /
                       f"load-{health['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(run, indent=2) + "\n")
    chart(run, out / "load.png")
    print(f"wrote {out}/results.json and load.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
