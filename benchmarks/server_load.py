"""A bounded load run against `vidsynth serve`: many clients submit jobs and poll their status on loopback.

Each client submits its jobs one after another (each with its own Idempotency-Key, and every third one sent twice,
as a client retrying after a timeout would), then polls until the job ends. Reports whether every job completed
exactly once and how fast status requests were answered while the worker was busy. Prints a Markdown table.

    python benchmarks/server_load.py [--clients 20] [--jobs 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

TINY = {"prompt": "a green triangle moving right on a black background", "frames": 2, "steps": 1}


def run_load(url: str, clients: int, jobs_per_client: int, settings: dict = TINY, timeout: float = 600) -> dict:
    latencies, submitted, failures = [], [], []
    lock = threading.Lock()

    def client_work(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for number in range(jobs_per_client):
                key = str(uuid.uuid4())
                body = {**settings, "seed": index * 1000 + number}
                job = client.post("/v1/videos", json=body, headers={"Idempotency-Key": key}).json()
                if number % 3 == 0:
                    again = client.post("/v1/videos", json=body, headers={"Idempotency-Key": key}).json()
                    if again["id"] != job["id"]:
                        with lock:
                            failures.append(f"retry made a second job: {job['id']} {again['id']}")
                deadline = time.monotonic() + timeout
                while True:
                    started = time.perf_counter()
                    status = client.get(f"/v1/videos/{job['id']}").json()["status"]
                    with lock:
                        latencies.append(time.perf_counter() - started)
                    if status not in ("queued", "in_progress"):
                        break
                    if time.monotonic() > deadline:
                        with lock:
                            failures.append(f"{job['id']} stuck in {status}")
                        break
                    time.sleep(0.05)
                with lock:
                    submitted.append((job["id"], status))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started

    with httpx.Client(base_url=url, timeout=60) as client:
        listed, after = [], None
        while True:
            page = client.get("/v1/videos", params={"limit": 100, **({"after": after} if after else {})}).json()
            listed += [job["id"] for job in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
    ids = [job_id for job_id, _ in submitted]
    latencies.sort()
    return {
        "jobs": len(submitted), "completed": sum(status == "completed" for _, status in submitted),
        "distinct_ids": len(set(ids)), "listed": len(listed), "unexpected_listed": len(set(listed) - set(ids)),
        "failures": failures, "wall_seconds": wall, "status_requests": len(latencies),
        "status_p50_ms": 1000 * statistics.median(latencies),
        "status_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "status_max_ms": 1000 * latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen([sys.executable, "-m", "vidsynth.cli", "serve", "--port", str(args.port),
                                   "--data-dir", data, "--max-queue", "1000"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{args.port}"
            for _ in range(600):
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            result = run_load(url, args.clients, args.jobs)
        finally:
            server.terminate()
            server.wait(30)
    print(f"Command: `python benchmarks/server_load.py --clients {args.clients} --jobs {args.jobs}`  ")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; date {date.today()}. "
          f"Job settings: {TINY}.\n")
    print("| measure | value |\n|---|---|")
    for key in ("jobs", "completed", "distinct_ids", "listed", "wall_seconds", "status_requests", "status_p50_ms",
                "status_p99_ms", "status_max_ms"):
        value = result[key]
        print(f"| {key.replace('_', ' ')} | {value:.1f} |" if isinstance(value, float) else f"| {key.replace('_', ' ')} | {value} |")
    if result["failures"]:
        print("\nfailures:", *result["failures"], sep="\n- ")


if __name__ == "__main__":
    main()
