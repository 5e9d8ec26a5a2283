"""A bounded load run against `vidsynth serve`: many clients submit jobs and poll their status on loopback.

Each client submits its jobs one after another (each with its own Idempotency-Key, and every third one sent twice,
as a client retrying after a timeout would), then polls until the job ends. Reports whether every job completed
exactly once and how fast status requests were answered while the worker was busy. Prints a Markdown table.

With `--watchers N` it measures instead what N event streams open on one job cost that job: jobs of the shipped
model's own video run one at a time, alternately watched by N streams (`GET /v1/videos/{id}/events`) and by none;
reports each side's median run time (the job's started_at to completed_at) and how late the streams received the
step events (receipt minus the event's `time`).

    python benchmarks/server_load.py [--clients 20] [--jobs 10]
    python benchmarks/server_load.py --watchers 50 [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
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
from machine import command_line, cpu_name  # noqa: E402

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


def watched_jobs(url: str, watchers: int, rounds: int, settings: dict) -> dict:
    """Alternately: a job nobody watches, then a job `watchers` event streams watch. Returns run times and lags."""
    run_seconds, lags = {0: [], watchers: []}, []
    # The watchers' HTTP clients are made before any job: making fifty (TLS set-up included) takes CPU time that the
    # job would otherwise lose to this process, not to the server.
    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(watchers + 1)]
    try:
        for round_index in range(rounds):
            for count in (0, watchers):
                job = clients[0].post("/v1/videos", json={**settings, "seed": round_index}).json()
                threads = [threading.Thread(target=_watch, args=(client, job["id"], lags))
                           for client in clients[1:count + 1]]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                while (finished := clients[0].get(f"/v1/videos/{job['id']}").json())["status"] not in (
                        "completed", "failed", "canceled"):
                    time.sleep(0.05)
                run_seconds[count].append(finished["completed_at"] - finished["started_at"])
    finally:
        for client in clients:
            client.close()
    lags.sort()
    return {"run_seconds": run_seconds, "lag_p50_ms": 1000 * statistics.median(lags),
            "lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))], "step_events": len(lags)}


def _watch(client: httpx.Client, job_id: str, lags: list) -> None:
    with client.stream("GET", f"/v1/videos/{job_id}/events") as response:
        connected = time.time()
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if event["event"] == "step" and event["time"] >= connected:  # not the ones replayed on joining
                    lags.append(time.time() - event["time"])
                if event["event"] in ("completed", "failed", "canceled", "deleted"):
                    return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--watchers", type=int, help="measure what this many event streams on a job cost it")
    parser.add_argument("--rounds", type=int, default=5, help="with --watchers: jobs on each side")
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
            if args.watchers:
                result = watched_jobs(url, args.watchers, args.rounds, {"prompt": TINY["prompt"]})
            else:
                result = run_load(url, args.clients, args.jobs)
        finally:
            server.terminate()
            server.wait(30)
    if args.watchers:
        print(f"Command: `{command_line()}`  \nMachine: {cpu_name()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; date {date.today()}. Jobs: the shipped model's own video.\n")
        print("| event streams on the job | median run time (s) | run times (s) |\n|---|---|---|")
        for count, seconds in result["run_seconds"].items():
            print(f"| {count} | {statistics.median(seconds):.3f} | {', '.join(f'{s:.3f}' for s in seconds)} |")
        print(f"\nStep events received {result['lag_p50_ms']:.1f} ms (p50), {result['lag_p99_ms']:.1f} ms (p99) "
              f"after the worker published them ({result['step_events']} receipts).")
        return
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
