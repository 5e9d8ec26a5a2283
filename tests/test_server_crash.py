"""Jobs outlive the server: kill -9 it mid-job, start it again, and every job still ends, none twice; a failed write
leaves nothing half-written."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import read_events
from test_server import PROMPT, _decode_mp4
from vidsynth.errors import WriteError
from vidsynth.jobs import FAILED, MAX_ATTEMPTS, QUEUED, SCHEMA, JobStore


def start_server(data_dir, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "vidsynth.cli", "serve", "--port", str(port), "--data-dir",
                                str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not start: {process.stderr.read()}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_progress(client: httpx.Client, job_id: str, percent: float) -> None:
    deadline = time.monotonic() + 60
    while client.get(f"/v1/videos/{job_id}").json()["progress"] < percent:
        assert time.monotonic() < deadline, "the first job never got going"
        time.sleep(0.05)


def test_kill_9_mid_job_loses_nothing(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            long = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 20, "seed": 1}).json()
            short = [client.post("/v1/videos", json={"prompt": PROMPT, "steps": 3, "frames": 8, "seed": s}).json()
                     for s in range(3)]
            wait_for_progress(client, long["id"], 10)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        server.kill()

    # What the dead process might have left: half a video where a finished one would go.
    stray = tmp_path / "videos" / long["id"]
    stray.mkdir(parents=True, exist_ok=True)
    (stray / "0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 half a file")

    server = start_server(tmp_path, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get(f"/v1/videos/{long['id']}/content").status_code == 409  # not served before it is redone
            ids = [long["id"], *(job["id"] for job in short)]
            deadline = time.monotonic() + 300
            while True:
                jobs = [client.get(f"/v1/videos/{job_id}").json() for job_id in ids]
                if all(job["status"] in ("completed", "failed", "canceled") for job in jobs):
                    break
                assert time.monotonic() < deadline, [job["status"] for job in jobs]
                time.sleep(0.2)
            assert [job["status"] for job in jobs] == ["completed"] * 4
            assert jobs[0]["attempts"] == 2 and jobs[0]["request"]["seed"] == 1
            listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
            assert sorted(job["id"] for job in listed) == sorted(ids)
            for job in jobs:
                frames = _decode_mp4(client.get(f"/v1/videos/{job['id']}/content").content)
                assert frames.shape[0] == job["request"]["frames"] and frames.std() > 1
    finally:
        server.terminate()
        server.wait(30)


def test_ctrl_c_stops_the_server_with_event_streams_open_and_requeues_the_running_job(tmp_path):
    """An open page holds an event stream that ends only with its job: Ctrl-C must not wait for the jobs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            running = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 400, "seed": 1}).json()
            waiting = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 3, "seed": 2}).json()
            wait_for_progress(client, running["id"], 0.1)
        received = {running["id"]: [], waiting["id"]: []}

        def watch(job_id):
            with httpx.Client(base_url=url, timeout=120) as own:
                with contextlib.suppress(httpx.HTTPError):  # cut by the server as it stops
                    with own.stream("GET", f"/v1/videos/{job_id}/events") as response:
                        received[job_id].extend(read_events(response))

        watchers = [threading.Thread(target=watch, args=(job_id,), daemon=True) for job_id in received]
        for watcher in watchers:
            watcher.start()
        deadline = time.monotonic() + 30
        while not all(received.values()):
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)
        server.wait(60)  # a hang here is the bug: waiting on streams that end only with their jobs
        for watcher in watchers:
            watcher.join(10)
            assert not watcher.is_alive()
    finally:
        server.kill()
    store = JobStore(tmp_path)
    stopped, queued = store.get(running["id"]), store.get(waiting["id"])
    store.close()
    assert stopped["status"] == queued["status"] == QUEUED  # both run when the server starts again
    assert stopped["attempts"] == 0  # a run stopped on purpose does not count against the job


def test_a_job_that_keeps_killing_the_server_fails_with_the_reason(tmp_path):
    store = JobStore(tmp_path)
    job, _ = store.create({"prompt": PROMPT}, outputs=1)
    for attempt in range(MAX_ATTEMPTS):
        assert store.claim_next()["id"] == job["id"]
        store.recover()  # the process died during the run
        expected = QUEUED if attempt < MAX_ATTEMPTS - 1 else FAILED
        assert store.get(job["id"])["status"] == expected
    failed = store.get(job["id"])
    assert failed["error"]["code"] == "interrupted" and "submit it again" in failed["error"]["message"]
    assert store.claim_next() is None


def test_a_data_folder_from_before_jobs_kept_warnings_opens_with_its_jobs(tmp_path):
    earlier_schema = SCHEMA.replace(",\n    warnings TEXT", "")
    assert earlier_schema != SCHEMA
    database = sqlite3.connect(tmp_path / "jobs.sqlite3")
    database.executescript(earlier_schema)
    database.execute("INSERT INTO jobs (id, status, request, outputs, created_at) VALUES (?, ?, ?, 1, 0)",
                     ("video_" + "0" * 24, QUEUED, json.dumps({"prompt": PROMPT})))
    database.commit()
    database.close()
    store = JobStore(tmp_path)
    job = store.claim_next()
    assert job["id"] == "video_" + "0" * 24 and job["warnings"] == []
    store.add_warning(job["id"], "first")
    store.add_warning(job["id"], "second")
    assert store.get(job["id"])["warnings"] == ["first", "second"]
    store.recover()  # the process died during the run: the next run gives its own warnings
    assert store.claim_next()["warnings"] == []


def test_retention_bounds_the_jobs_kept(tmp_path):
    store = JobStore(tmp_path)
    made = []
    for _ in range(5):
        job, _ = store.create({"prompt": PROMPT}, outputs=1)
        store.claim_next()
        (tmp_path / "videos" / job["id"]).mkdir()
        store.finish(job["id"], "completed")
        made.append(job["id"])
    assert store.prune(keep=2) == 3
    kept = [job["id"] for job in store.list(10)[0]]
    assert kept == made[:-3:-1]
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == sorted(made[-2:])
    assert np.all([store.get(job_id) is None for job_id in made[:3]])


def test_an_upload_whose_write_fails_leaves_no_file(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    real_write = Path.write_bytes

    def disk_full(path, data):
        real_write(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(WriteError, match=r"could not write .*upload_.*\.png: No space left on device"):
        store.add_upload(b"\x89PNG" + b"\0" * 1000, "image/png")
    assert list((tmp_path / "uploads").iterdir()) == []
    monkeypatch.setattr(Path, "write_bytes", real_write)
    upload_id, path = store.add_upload(b"\x89PNG" + b"\0" * 1000, "image/png")
    assert path.name.startswith(upload_id) and path.read_bytes().startswith(b"\x89PNG")
    assert list((tmp_path / "uploads").iterdir()) == [path]
