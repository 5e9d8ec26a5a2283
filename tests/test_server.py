"""The job API over real HTTP on loopback, with the shipped model."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LiveServer, read_events
from vidsynth import InputError, ModelError, NumericalError, OutOfMemoryError, RequestError, WriteError
import vidsynth.server as server_module
from vidsynth.jobs import JobChanges
from vidsynth.request import MAX_FRAMES, MAX_SIDE, GenerationRequest
from vidsynth.files import write_errors_reported
from vidsynth.server import ServerSettings, create_app
from vidsynth.video import read_frames

PROMPT = "a blue square moving up on a white background"
FAST = {"frames": 8, "steps": 4}
SLOW = {"frames": 16, "steps": 400}  # long enough to be caught running, and cancelled


@pytest.fixture(scope="module")
def server(shipped_pipeline, tmp_path_factory):
    data = tmp_path_factory.mktemp("server-data")
    with LiveServer(create_app(ServerSettings(data_dir=data), pipeline=shipped_pipeline)) as live:
        live.data_dir = data
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def submit(client, **fields) -> dict:
    response = client.post("/v1/videos", json={"prompt": PROMPT, **fields})
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(client, job_id: str, statuses=("completed", "failed", "canceled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['status']}"
        time.sleep(0.05)


def wait_until_running(client, job_id: str) -> None:
    with client.stream("GET", f"/v1/videos/{job_id}/events") as response:
        for event in read_events(response):
            if event["event"] == "step":
                return
    raise AssertionError("the job never reached a denoising step")


def test_submit_stream_poll_and_fetch(client):
    job = submit(client, seed=7, **FAST)
    assert job["status"] in ("queued", "in_progress") and job["request"]["seed"] == 7
    assert job["request"]["height"] == 64 and job["request"]["guidance"] == 4.0  # the model's defaults, resolved

    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    names = [e["event"] for e in events]
    assert names[-1] == "completed"
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(steps[0], 5)) and steps[-1] == 4
    assert names.index("decoding") > names.index("step") and "encoding" in names and "warning" not in names

    done = client.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] >= done["started_at"]
    assert done["warnings"] == []
    times = [e["time"] for e in events]  # when each happened, by the server's clock (the page's time-left estimate)
    assert times == sorted(times) and done["created_at"] <= times[0] and times[-1] <= done["completed_at"] + 1

    video = client.get(f"/v1/videos/{job['id']}/content")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    frames = _decode_mp4(video.content)
    assert frames.shape == (8, 64, 64, 3)
    head = client.head(f"/v1/videos/{job['id']}/content")  # what a download tool asks first
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "video/mp4"
    assert int(head.headers["content-length"]) == len(video.content) and head.headers["accept-ranges"] == "bytes"

    partial = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=10-109"})
    assert partial.status_code == 206
    assert partial.content == video.content[10:110]
    assert partial.headers["content-range"] == f"bytes 10-109/{len(video.content)}"

    thumbnail = client.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"})
    assert thumbnail.headers["content-type"] == "image/png"
    middle = np.asarray(Image.open(io.BytesIO(thumbnail.content)).convert("RGB")).astype(int)
    assert middle.shape == (64, 64, 3) and np.abs(middle - frames[4]).mean() < 8  # the mp4 frame is lossy
    gif = client.get(f"/v1/videos/{job['id']}/content", params={"variant": "gif"})
    assert gif.headers["content-type"] == "image/gif" and Image.open(io.BytesIO(gif.content)).n_frames == 8
    beyond = client.get(f"/v1/videos/{job['id']}/content", params={"index": 1})
    assert beyond.status_code == 422
    assert beyond.json()["error"]["fields"] == [{"field": "index", "message": "this job made 1 video(s)"}]


def test_changes_wake_the_streams_of_their_job_from_any_thread():
    async def scenario():
        changes = JobChanges()
        mine, others = changes.watch("video_a"), changes.watch("video_b")
        threading.Thread(target=changes.notify, args=("video_a",)).start()
        await changes.wait("video_a", mine, timeout=10)
        assert mine.done() and not others.done()
        threading.Thread(target=changes.notify).start()  # a status change: every stream looks again
        await changes.wait("video_b", others, timeout=10)
        assert others.done()
        unchanged = changes.watch("video_a")
        started = time.monotonic()
        await changes.wait("video_a", unchanged, timeout=0.2)
        assert time.monotonic() - started >= 0.2 and changes._waiting == {}  # timed out, and forgotten

    asyncio.run(scenario())


def test_event_streams_follow_a_queued_job_without_waiting_on_a_timer(client, monkeypatch):
    """With the streams' recheck a minute away, a queued job's stream still moves at once through every change: a
    job ahead deleted, the running one canceled, its own run's steps as they happen."""
    monkeypatch.setattr(server_module, "EVENT_RECHECK_SECONDS", 60.0)
    running, ahead, mine = submit(client, **SLOW), submit(client, **FAST), submit(client, **FAST)
    wait_until_running(client, running["id"])
    received = []  # (event, when it arrived)

    def watch():
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            with own.stream("GET", f"/v1/videos/{mine['id']}/events") as response:
                received.extend((event, time.time()) for event in read_events(response))

    def wait_for_event(name: str) -> None:
        """Until `name` arrives, each event within 10 s of the one before: a wake-up takes milliseconds, a missed one
        the minute (a slow machine's steps take longer, not that long)."""
        deadline, seen = time.monotonic() + 10, len(received)
        while not any(event["event"] == name for event, _ in received):
            if len(received) > seen:
                deadline, seen = time.monotonic() + 10, len(received)
            assert time.monotonic() < deadline, f"no {name!r} event after {[e['event'] for e, _ in received]}"
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for_event("queued")
    client.delete(f"/v1/videos/{ahead['id']}")
    deadline = time.monotonic() + 10
    while [event.get("queue_position") for event, _ in received] != [1, 0]:
        assert time.monotonic() < deadline, f"the queue position never moved: {received}"
        time.sleep(0.02)
    client.post(f"/v1/videos/{running['id']}/cancel")
    wait_for_event("completed")
    names = [event["event"] for event, _ in received]
    assert names.count("started") == 1 and names[-1] == "completed"
    completed_at = received[-1][0]["time"]
    first_step_arrived = next(arrived for event, arrived in received if event["event"] == "step")
    assert first_step_arrived < completed_at  # streamed as it ran, not all at the end


def test_a_reconnecting_event_stream_resumes_after_the_last_event_id(client):
    job = submit(client, **FAST)
    wait_for(client, job["id"])
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        lines = list(response.iter_lines())
    ids = [line.removeprefix("id: ").split(".") for line in lines if line.startswith("id: ")]
    runs, counts = {run for run, _ in ids}, [int(count) for _, count in ids]
    assert len(runs) == 1 and counts == list(range(1, len(ids) + 1)) and len(ids) > 3
    run = runs.pop()

    def reopened(last_event_id):
        with client.stream("GET", f"/v1/videos/{job['id']}/events", headers={"Last-Event-ID": last_event_id}) as response:
            return list(read_events(response))

    everything = reopened("")
    resumed = reopened(f"{run}.{counts[-3]}")
    assert resumed == everything[-2:] and resumed[-1]["event"] == "completed"
    # An id from before a restart counts events of another log: the stream starts over rather than skip any.
    assert reopened(f"{'0' * len(run)}.{counts[-3]}") == everything == reopened(str(counts[-3]))


def test_a_jobs_warnings_are_streamed_and_kept_with_it(client):
    job = submit(client, prompt="a blue car moving up on a white background", negative_prompt="blurry " * 80, **FAST)
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = list(read_events(response))
    names = [event["event"] for event in events]
    warnings = [event["message"] for event in events if event["event"] == "warning"]
    assert names[-1] == "completed" and names.index("warning") < names.index("step")
    assert len(warnings) == 1 and warnings[0].startswith("vidsynth-tiny never saw 'car', 'blurry' in its training")
    assert client.get(f"/v1/videos/{job['id']}").json()["warnings"] == warnings


def _decode_mp4(data: bytes) -> np.ndarray:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        frames, fps = read_frames(handle.name)
    assert fps == 8
    return frames


def test_same_seed_same_video_and_a_drawn_seed_is_reported(client):
    first, second = submit(client, seed=3, **FAST), submit(client, seed=3, **FAST)
    drawn = submit(client, **FAST)
    for job in (first, second, drawn):
        assert wait_for(client, job["id"])["status"] == "completed"
    assert isinstance(drawn["request"]["seed"], int)
    # The GIF holds the exact frames (an 8-bit palette of them); the same seed must give the same ones.
    gifs = [client.get(f"/v1/videos/{job['id']}/content", params={"variant": "gif"}).content for job in (first, second)]
    assert gifs[0] == gifs[1]


def test_cancel_a_queued_job_and_a_running_one(client):
    running = submit(client, **SLOW)
    queued = submit(client, **FAST)
    wait_until_running(client, running["id"])

    canceled = client.post(f"/v1/videos/{queued['id']}/cancel").json()
    assert canceled["status"] == "canceled"

    with client.stream("GET", f"/v1/videos/{running['id']}/events") as response:
        stream = read_events(response)
        client.post(f"/v1/videos/{running['id']}/cancel")
        rest = list(stream)
    assert rest[-1]["event"] == "canceled" and not any(e["event"] == "decoding" for e in rest)
    stopped = wait_for(client, running["id"], timeout=10)
    assert stopped["status"] == "canceled" and stopped["progress"] < 90

    time.sleep(0.5)
    never_ran = client.get(f"/v1/videos/{queued['id']}").json()
    assert never_ran["status"] == "canceled" and never_ran["started_at"] is None
    assert client.get(f"/v1/videos/{running['id']}/content").status_code == 409

    finished = submit(client, **FAST)
    wait_for(client, finished["id"])
    refused = client.post(f"/v1/videos/{finished['id']}/cancel")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_cancelable"


def test_cancel_takes_effect_within_a_step(client):
    job = submit(client, **SLOW)
    wait_until_running(client, job["id"])
    client.post(f"/v1/videos/{job['id']}/cancel")
    flagged_at = time.time()  # the server runs in this process: one clock
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = list(read_events(response))
    late_steps = [e for e in events if e["event"] == "step" and e["time"] > flagged_at]
    # The step running when the flag was set may still report; the next callback stops the job.
    assert len(late_steps) <= 1, late_steps
    assert events[-1]["event"] == "canceled"
    assert client.get(f"/v1/videos/{job['id']}").json()["status"] == "canceled"


def test_delete_removes_the_job_and_its_files(client, server):
    job = submit(client, **FAST)
    wait_for(client, job["id"])
    folder = server.data_dir / "videos" / job["id"]
    assert (folder / "0.mp4").is_file()
    deleted = client.delete(f"/v1/videos/{job['id']}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 404
    assert not folder.exists()

    running = submit(client, **SLOW)
    wait_until_running(client, running["id"])
    assert client.delete(f"/v1/videos/{running['id']}").status_code == 200
    deadline = time.monotonic() + 10
    while client.get("/healthz").json()["running"] == running["id"]:
        assert time.monotonic() < deadline, "the deleted job kept running"
        time.sleep(0.05)
    assert not (server.data_dir / "videos" / running["id"]).exists()


def test_idempotency_key_returns_the_same_job(client):
    body = {"prompt": PROMPT, **FAST}
    first = client.post("/v1/videos", json=body, headers={"Idempotency-Key": "retry-1"})
    again = client.post("/v1/videos", json=body, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert again.json()["request"]["seed"] == first.json()["request"]["seed"]
    other = client.post("/v1/videos", json={**body, "steps": 5}, headers={"Idempotency-Key": "retry-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
    assert [j["id"] for j in listed].count(first.json()["id"]) == 1
    wait_for(client, first.json()["id"])


@pytest.mark.parametrize("fields, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"frames": 0}, "frames"),
    ({"frames": MAX_FRAMES + 1}, "frames"),
    ({"height": 60}, "height"),
    ({"width": 0}, "width"),
    ({"width": MAX_SIDE + 8}, "width"),
    ({"steps": 0}, "steps"),
    ({"guidance": -1}, "guidance"),
    ({"guidance": "NaN"}, "guidance"),
    ({"scheduler": "ddpm-fancy"}, "scheduler"),
    ({"seed": -1}, "seed"),
    ({"num_videos": 0}, "num_videos"),
    ({"colour": "red"}, "colour"),
    ({"prompt": None}, "prompt"),
])
def test_bad_requests_get_422_naming_the_field(client, fields, field):
    response = client.post("/v1/videos", json={"prompt": PROMPT, **fields})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and field in error["message"] and error["code"] == "invalid_request"
    assert error["fields"][0]["field"] == field and not error["fields"][0]["message"].startswith(f"{field}:")


def test_malformed_json_and_oversized_bodies(client):
    response = client.post("/v1/videos", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    response = client.post("/v1/videos", json={"prompt": "x" * 100_000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("job_id", ["video_000000000000000000000000", "nope", "..%2F..%2Fjobs.sqlite3",
                                    "video_%2E%2E"])
def test_unknown_ids_get_404(client, job_id):
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/content"), ("GET", "/events")]:
        response = client.request(method, f"/v1/videos/{job_id}{path}")
        assert response.status_code == 404, (method, path, response.text)


def test_list_is_newest_first_and_pages(client):
    ids = [submit(client, **FAST)["id"] for _ in range(3)]
    first = client.get("/v1/videos", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = client.get("/v1/videos", params={"limit": 2, "after": first["last_id"]}).json()
    assert second["data"][0]["id"] == ids[0]
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 422
    assert client.get("/v1/videos", params={"after": "video_000000000000000000000000"}).status_code == 422
    for job_id in ids:
        wait_for(client, job_id)


def test_settings_name_the_words_the_model_knows(client):
    settings = client.get("/v1/settings").json()
    assert settings["model"] == "vidsynth-tiny" and settings["defaults"]["steps"] == 6
    assert settings["preset_settings"]["quality"] == {"steps": 6, "scheduler": "ddim", "cache_interval": 1,
                                                      "guidance_fraction": 0.5}
    assert settings["preset_settings"]["fast"] == {"steps": 3, "scheduler": "dpm++", "cache_interval": 1,
                                                   "guidance_fraction": 0.5}
    assert len(settings["vocabulary"]) == 27 and {"circle", "left", "background"} <= set(settings["vocabulary"])


def test_health_and_docs(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "vidsynth-tiny" and health["ready"] is True
    assert client.get("/docs").status_code == 200


def test_the_openapi_description_gives_the_shapes_the_api_answers_with(client):
    spec = client.get("/openapi.json").json()
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    operation_ids = [operation["operationId"] for methods in paths.values() for operation in methods.values()]
    assert len(operation_ids) == len(set(operation_ids))  # clients generated from the description name methods so
    job = submit(client, **FAST)
    listed = client.get("/v1/videos", params={"limit": 1}).json()
    assert set(schemas["Job"]["properties"]) == set(job) == set(listed["data"][0])  # every field, and only those
    assert set(schemas["JobList"]["properties"]) == set(listed)
    missing = client.get("/v1/videos/video_000000000000000000000000").json()
    assert set(schemas["ErrorDetail"]["properties"]) == set(missing["error"])
    def answer(path, method, status):
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]

    assert answer("/v1/videos/{job_id}", "get", "200").endswith("/Job")
    assert answer("/v1/videos", "post", "202").endswith("/Job")
    assert all(answer("/v1/videos", "post", status).endswith("/ErrorBody")
               for status in ("401", "409", "413", "422", "429"))


def test_a_compiled_server_compiles_before_its_first_job_which_waits_for_it(held_compile, tmp_path):
    with (LiveServer(create_app(ServerSettings(data_dir=tmp_path), pipeline=held_compile.pipeline)) as live,
          httpx.Client(base_url=live.url, timeout=60) as client):
        assert client.get("/healthz").json()["ready"] is False
        job = submit(client, steps=2)  # the model's own video size, with guidance: what the server compiled for
        time.sleep(0.5)
        assert client.get(f"/v1/videos/{job['id']}").json()["status"] == "queued"
        held_compile.release.set()
        job = wait_for(client, job["id"])
        assert job["status"] == "completed"
        assert client.get("/healthz").json()["ready"] is True
    assert held_compile.compiled_at and max(held_compile.compiled_at) < job["started_at"]


def test_full_queue_gets_429(shipped_pipeline, tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path, max_queue=2), pipeline=shipped_pipeline)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        busy = submit(client, **SLOW)
        wait_until_running(client, busy["id"])
        waiting = [submit(client, **FAST) for _ in range(2)]
        refused = client.post("/v1/videos", json={"prompt": PROMPT})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert "retry-after" in refused.headers
        for job in (busy, *waiting):
            client.post(f"/v1/videos/{job['id']}/cancel")


def test_token_guards_every_route_but_health(shipped_pipeline, tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path, token="s3cret"), pipeline=shipped_pipeline)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/"), ("GET", "/docs"),
                             ("GET", "/static/app.js"), ("GET", "/v1/videos/video_000000000000000000000000")]:
            response = client.request(method, path, json={"prompt": PROMPT} if method == "POST" else None)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "unauthorized"
        wrong = client.get("/v1/videos", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = client.get("/v1/videos", headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200

        signed_in = client.get("/", params={"token": "s3cret"}, follow_redirects=True)
        assert signed_in.status_code == 200 and "<title>vidsynth</title>" in signed_in.text
        assert client.get("/v1/videos").status_code == 200  # the cookie set by /?token=


def test_serve_refuses_a_public_address_without_a_token(tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "vidsynth.cli", "serve", "--host", "0.0.0.0", "--data-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "without a token" in done.stderr


def test_serve_refuses_a_busy_port_or_a_damaged_job_database_before_loading_and_a_bad_model_without_a_traceback(
        tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        script = ("import sys; from vidsynth.cli import main; code = main(sys.argv[1:]); "
                  "print('diffusers' in sys.modules); sys.exit(code)")
        busy = subprocess.run([sys.executable, "-c", script, "serve", "--port", str(port), "--data-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert busy.stdout.strip() == "False"  # refused before the model libraries were imported
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "jobs.sqlite3").write_bytes(b"not a database " * 100)
    damaged = subprocess.run([sys.executable, "-c", script, "serve", "--port", "0", "--data-dir",
                              str(tmp_path / "damaged")], capture_output=True, text=True, timeout=60)
    assert damaged.returncode == 2 and damaged.stdout.strip() == "False"
    assert damaged.stderr.strip() == (f"vidsynth: error: cannot use the job database "
                                      f"{tmp_path / 'damaged' / 'jobs.sqlite3'}: file is not a database")
    (tmp_path / "a-file").write_text("not a folder")
    as_file = subprocess.run([sys.executable, "-c", script, "serve", "--port", "0", "--data-dir",
                              str(tmp_path / "a-file")], capture_output=True, text=True, timeout=60)
    assert as_file.returncode == 2 and as_file.stdout.strip() == "False"
    assert f"--data-dir {tmp_path / 'a-file'} is a file; give a folder" in as_file.stderr
    (tmp_path / "not-a-model").mkdir()
    broken = subprocess.run([sys.executable, "-m", "vidsynth.cli", "serve", "--port", "0", "--model",
                             str(tmp_path / "not-a-model"), "--data-dir", str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2 and "is neither a diffusers-layout model folder" in broken.stderr
    assert "Traceback" not in broken.stderr


@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_serve_without_the_server_extra_says_what_to_install(package):
    import subprocess
    import sys
    hidden = f"import sys; sys.modules[{package!r}] = None; from vidsynth.cli import main; sys.exit(main(['serve']))"
    done = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pip install 'vidsynth[server]'" in done.stderr and package in done.stderr
    assert "Traceback" not in done.stderr


def test_the_readme_names_every_field_a_job_takes_and_every_code_a_failed_job_gives():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `POST /v1/videos` |"))
    fields = re.findall(r"`([a-z_]+)`", row.split("(as the CLI:", 1)[1].split(")", 1)[0])
    assert sorted(fields) == sorted(GenerationRequest.model_fields)
    row = next(line for line in readme.splitlines() if line.startswith("| `GET /v1/videos/{id}` |"))
    codes = re.findall(r"`([a-z_]+)`", row.split("a failed job's `code`:", 1)[1].split(")", 1)[0])
    raised_in_a_job = (RequestError, InputError, ModelError, NumericalError, OutOfMemoryError, WriteError)
    assert sorted(codes) == sorted([error.code for error in raised_in_a_job] + ["interrupted", "internal_error"])


def test_a_job_starts_from_a_finished_jobs_video(client, server):
    red = submit(client, prompt="a red circle moving right on a white background", seed=1, **FAST)
    red = wait_for(client, red["id"])
    job = submit(client, prompt="a blue circle moving right on a white background", init_video=red["id"], strength=0.5,
                 seed=2, steps=4)
    assert job["request"]["init_video"] == red["id"] and job["request"]["frames"] == 8  # the start video's length
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        names = [event["event"] for event in read_events(response)]
    assert names.index("start_video") < names.index("step") and names[-1] == "completed"
    frames = _decode_mp4(client.get(f"/v1/videos/{job['id']}/content").content)
    start = _decode_mp4(client.get(f"/v1/videos/{red['id']}/content").content)
    assert frames.shape == start.shape == (8, 64, 64, 3)
    assert (frames[..., 2].astype(int) - frames[..., 0]).mean() > 0 > (start[..., 2].astype(int) - start[..., 0]).mean()
    with open(server.data_dir / "videos" / job["id"] / "0.mp4", "rb") as handle:  # the file names the job, not a path
        assert f'"init_video":"{red["id"]}"' in handle.read().decode("latin-1")

    by_index = submit(client, init_video=f"{red['id']}/0", strength=0.3, steps=4)
    assert wait_for(client, by_index["id"])["status"] == "completed"


def test_start_videos_that_are_not_finished_jobs_get_422(client, server, tmp_path):
    finished = wait_for(client, submit(client, **FAST)["id"])
    unfinished = submit(client, **SLOW)
    some_file = tmp_path / "start.npy"
    np.save(some_file, np.zeros((4, 64, 64, 3), np.uint8))
    cases = [
        (str(some_file), "files on the server are not read over HTTP"),
        ("video_" + "0" * 24, "no video job"),
        (unfinished["id"], "start from a completed one"),
        (f"{finished['id']}/1", "made 1 video(s), numbered from 0"),
    ]
    for reference, message in cases:
        response = client.post("/v1/videos", json={"prompt": PROMPT, "init_video": reference})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "init_video" and message in error["message"], error
    response = client.post("/v1/videos", json={"prompt": PROMPT, "strength": 0.5})
    assert response.status_code == 422 and response.json()["error"]["field"] == "strength"
    client.post(f"/v1/videos/{unfinished['id']}/cancel")


@pytest.mark.parametrize("body, content_type, status, message", [
    (b'{"prompt": "a red circle",', "application/json", 422,
     "body: not valid JSON (Expecting property name enclosed in double quotes at character 26)"),
    (b'{"prompt": "a red circle"}', "application/x-www-form-urlencoded", 415,  # curl -d without -H
     "body: send the settings as JSON, with Content-Type: application/json (not application/x-www-form-urlencoded)"),
    (b'["a red circle"]', "application/json", 422, 'body: send the settings as a JSON object, such as {"prompt": '
                                                    '"a red circle"}'),
    (b"", "application/json", 422, 'body: send the settings as a JSON object, such as {"prompt": "a red circle"}'),
])
def test_a_body_that_is_no_json_object_is_answered_with_what_to_send(client, body, content_type, status, message):
    response = client.post("/v1/videos", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status
    assert response.json()["error"]["message"] == message and response.json()["error"]["field"] == "body"


def test_a_start_video_deleted_before_its_job_runs_fails_that_job_with_the_reason(client):
    start = wait_for(client, submit(client, **FAST)["id"])
    blocker = submit(client, **SLOW)
    waiting = submit(client, init_video=start["id"], steps=4)
    assert client.delete(f"/v1/videos/{start['id']}").status_code == 200
    client.post(f"/v1/videos/{blocker['id']}/cancel")
    failed = wait_for(client, waiting["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert failed["error"]["message"] == f"init_video: no video job {start['id']!r}"


def test_a_job_that_runs_out_of_memory_fails_saying_what_to_change_and_the_next_job_runs(client, shipped_pipeline,
                                                                                         monkeypatch):
    original = shipped_pipeline.denoise

    def denoise(noise, *args, **kwargs):
        if noise.shape[2] == 12:  # this test's 12-frame video does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(noise, *args, **kwargs)

    monkeypatch.setattr(shipped_pipeline, "denoise", denoise)
    failed = wait_for(client, submit(client, frames=12, steps=4)["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory"
    assert failed["error"]["message"].startswith("out of memory making the video") and "fewer frames" in \
        failed["error"]["message"]
    assert wait_for(client, submit(client, **FAST)["id"])["status"] == "completed"


def test_a_job_whose_files_cannot_be_written_fails_with_the_reason_and_the_next_job_runs(client, server, monkeypatch):
    import vidsynth.worker as worker_module
    original = worker_module.write_video

    def write_video(path, frames, *args, **kwargs):
        if len(frames) == 6:  # this test's 6-frame video meets a full disk, as write_video reports one
            with write_errors_reported(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path, frames, *args, **kwargs)

    monkeypatch.setattr(worker_module, "write_video", write_video)
    failed = wait_for(client, submit(client, frames=6, steps=4)["id"])
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "write_error", "message": "could not write this job's videos: No space left on device"}
    assert client.get(f"/v1/videos/{failed['id']}/content").status_code == 409
    assert not [path.name for path in (server.data_dir / "videos").iterdir() if failed["id"] in path.name]
    assert wait_for(client, submit(client, **FAST)["id"])["status"] == "completed"


def test_a_full_job_database_answers_507_and_the_server_goes_on_once_there_is_room(shipped_pipeline, tmp_path,
                                                                                  monkeypatch):
    stores = []

    class RecordedStore(server_module.JobStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(server_module, "JobStore", RecordedStore)
    with LiveServer(create_app(ServerSettings(data_dir=tmp_path), pipeline=shipped_pipeline)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        [store] = stores
        # The database may not grow past its size now: SQLite then fails as on a full disk (SQLITE_FULL).
        store._query(f"PRAGMA max_page_count = {store._query('PRAGMA page_count')[0][0]}")
        responses = [client.post("/v1/videos", json={"prompt": PROMPT, "negative_prompt": "x" * 2000, **FAST})
                     for _ in range(4)]
        full = responses[-1]
        assert full.status_code == 507, [response.status_code for response in responses]
        assert full.json()["error"]["code"] == "write_error"
        assert full.json()["error"]["message"] == ("the server could not store what this request needs: database or "
                                                   "disk is full")
        assert str(tmp_path) not in full.text
        # A write in place, as a job's progress, can succeed while the database cannot grow: still full.
        store._query("UPDATE jobs SET progress = progress")
        assert client.get("/healthz").json()["status"] == "disk_full"
        store._query("PRAGMA max_page_count = 1000000")
        assert client.get("/healthz").json()["status"] == "ok"  # without waiting for the next job
        assert wait_for(client, submit(client, **FAST)["id"])["status"] == "completed"
        assert client.get("/healthz").json()["status"] == "ok"


FULL_DISK = "database or disk is full"
FAILING_DISK = "disk I/O error"


class FailingStore(server_module.JobStore):
    """A job store whose disk can fill up (every write then fails as SQLite fails on a full disk, reads go on) or fail
    (every statement fails as on a disk giving I/O errors), now or from the next job's first denoising step."""
    instances: list = []
    failure = None  # None, FULL_DISK or FAILING_DISK
    failure_from_next_step = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.instances.append(self)

    def set_progress(self, job_id: str, progress: float, phase: str) -> None:
        if phase == "denoise" and self.failure_from_next_step:
            self.failure, self.failure_from_next_step = self.failure_from_next_step, None
        super().set_progress(job_id, progress, phase)

    @contextlib.contextmanager
    def _database(self):
        with super()._database() as database:
            yield _FailingDisk(database, self.failure) if self.failure else database


class _FailingDisk:
    def __init__(self, database, failure: str):
        self._database, self._failure = database, failure

    def execute(self, sql: str, parameters=()):
        if self._failure == FAILING_DISK or not sql.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            raise sqlite3.OperationalError(self._failure)
        return self._database.execute(sql, parameters)


@pytest.fixture
def failing_stores(monkeypatch) -> list:
    """The servers a test makes keep their jobs in FailingStores (listed here, as they are made); their workers try
    a refused write again at once, and their event streams send keep-alives often, so a stuck stream times out."""
    import vidsynth.worker as worker_module
    monkeypatch.setattr(worker_module, "DATABASE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(server_module, "KEEPALIVE_SECONDS", 0.5)
    monkeypatch.setattr(FailingStore, "instances", [])
    monkeypatch.setattr(server_module, "JobStore", FailingStore)
    return FailingStore.instances


@contextlib.contextmanager
def events_of_a_job_on_a_failing_disk(client, store: FailingStore, failure: str):
    """A job submitted, the store's disk full or failing from its first denoising step, and its events."""
    store.failure_from_next_step = failure
    job = submit(client, **FAST)
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        yield job, read_events(response, timeout=60)


@pytest.mark.parametrize("failure", [FULL_DISK, FAILING_DISK])
def test_a_job_that_finishes_on_a_full_or_failing_disk_keeps_its_result_until_the_disk_works(
        shipped_pipeline, tmp_path, failing_stores, failure):
    with LiveServer(create_app(ServerSettings(data_dir=tmp_path), pipeline=shipped_pipeline)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        [store] = failing_stores
        # From its first step the job's progress cannot be saved, nor its result.
        with events_of_a_job_on_a_failing_disk(client, store, failure) as (running, events):
            warning = next(event for event in events if event["event"] == "warning")
            health = client.get("/healthz").json()
            if failure == FULL_DISK:
                assert warning["message"] == ("the server's disk is full: this job's result is recorded once there "
                                              "is room")
                assert client.get(f"/v1/videos/{running['id']}").json()["status"] == "in_progress"
                assert client.post("/v1/videos", json={"prompt": PROMPT, **FAST}).status_code == 507
                assert health["status"] == "disk_full"
            else:
                assert warning["message"] == ("the server's job database failed (disk I/O error): this job's result "
                                              "is recorded once it works again")
                assert client.get(f"/v1/videos/{running['id']}").status_code == 500
                assert health["status"] == "database_error" and health["queued"] is None
            time.sleep(0.3)  # the worker keeps trying, the queue waits without losing its worker, the stream stays
            store.failure = None
            rest = [event["event"] for event in events]
        assert rest[-1] == "completed" and "failed" not in rest
        done = client.get(f"/v1/videos/{running['id']}").json()
        assert done["status"] == "completed" and done["progress"] == 100
        assert client.get("/healthz").json()["status"] == "ok"
        frames = _decode_mp4(client.get(f"/v1/videos/{running['id']}/content").content)
        assert frames.shape == (8, 64, 64, 3)
        assert wait_for(client, submit(client, **FAST)["id"])["status"] == "completed"


def test_a_result_waiting_for_room_when_the_server_stops_is_made_again_after_the_restart(shipped_pipeline, tmp_path,
                                                                                        failing_stores):
    with LiveServer(create_app(ServerSettings(data_dir=tmp_path), pipeline=shipped_pipeline)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        [store] = failing_stores
        with events_of_a_job_on_a_failing_disk(client, store, FULL_DISK) as (job, events):
            next(event for event in events if event["event"] == "warning")
    # Stopped while the result waited for room; the disk has room again when the server comes back.
    with LiveServer(create_app(ServerSettings(data_dir=tmp_path), pipeline=shipped_pipeline)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        done = wait_for(client, job["id"])
        assert done["status"] == "completed" and done["attempts"] == 2
        assert _decode_mp4(client.get(f"/v1/videos/{job['id']}/content").content).shape == (8, 64, 64, 3)


def test_a_queue_that_fails_to_answer_does_not_take_the_worker_down(client, monkeypatch):
    import vidsynth.worker as worker_module
    monkeypatch.setattr(worker_module, "DATABASE_RETRY_SECONDS", 0.05)
    original, failures = server_module.JobStore.claim_next, []

    def claim_next(store):
        if len(failures) < 3:
            failures.append("disk I/O error")
            raise sqlite3.OperationalError("disk I/O error")
        return original(store)

    monkeypatch.setattr(server_module.JobStore, "claim_next", claim_next)
    assert wait_for(client, submit(client, **FAST)["id"])["status"] == "completed"
    assert len(failures) == 3


def test_an_unexpected_failure_is_answered_in_the_apis_error_shape(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server_module.JobStore, "list", broken)
    response = client.get("/v1/videos")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error" and "a bug" not in response.text


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_uploaded_image_starts_a_job(client, server):
    image = np.full((48, 80, 3), 255, np.uint8)
    image[16:32, 8:24] = (220, 30, 30)
    response = client.post("/v1/uploads", content=_png(image), headers={"Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    upload = response.json()
    assert upload["id"].startswith("upload_") and (upload["width"], upload["height"]) == (80, 48)
    job = submit(client, prompt="a red square moving right on a white background", init_video=upload["id"],
                 strength=0.9, seed=1, steps=6)
    assert job["request"]["init_video"] == upload["id"] and job["request"]["frames"] == 16  # the model's, for an image
    done = wait_for(client, job["id"])
    assert done["status"] == "completed", done["error"]
    frames = _decode_mp4(client.get(f"/v1/videos/{job['id']}/content").content)
    assert frames.shape == (16, 64, 64, 3)
    assert (frames[..., 0].astype(int) - frames[..., 2]).mean() > 0  # red, as the image and the prompt have it


def test_bad_uploads_are_refused_and_leave_nothing(client, server):
    uploads = server.data_dir / "uploads"
    before = sorted(uploads.iterdir())
    response = client.post("/v1/uploads", content=b"not an image", headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "body"
    assert "is not a readable image/png file" in response.json()["error"]["message"]
    response = client.post("/v1/uploads", content=b"%PDF-1.4", headers={"Content-Type": "application/pdf"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = client.post("/v1/uploads", content=b"", headers={"Content-Type": "video/mp4"})
    assert response.status_code == 422
    huge = _png(np.zeros((8, MAX_SIDE + 8, 3), np.uint8))
    response = client.post("/v1/uploads", content=huge, headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and f"at most {MAX_SIDE} a side" in response.json()["error"]["message"]
    assert sorted(uploads.iterdir()) == before
    response = client.post("/v1/videos", json={"prompt": PROMPT, "init_video": "upload_" + "0" * 24})
    assert response.status_code == 422 and "no upload" in response.json()["error"]["message"]


def test_uploads_are_bounded_in_size_and_number(shipped_pipeline, tmp_path):
    settings = ServerSettings(data_dir=tmp_path, max_upload_bytes=1000, keep_jobs=2)
    with LiveServer(create_app(settings, pipeline=shipped_pipeline)) as live:
        response = httpx.post(f"{live.url}/v1/uploads", content=b"x" * 1001, headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        ids = []
        for shade in (0, 100, 200):
            image = _png(np.full((8, 8, 3), shade, np.uint8))
            response = httpx.post(f"{live.url}/v1/uploads", content=image, headers={"Content-Type": "image/png"})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
            time.sleep(0.01)  # distinct modification times
        kept = sorted(path.name.split(".")[0] for path in (tmp_path / "uploads").iterdir())
        assert kept == sorted(ids[1:])  # the oldest went
        response = httpx.post(f"{live.url}/v1/videos", json={"prompt": PROMPT, "init_video": ids[0]})
        assert response.status_code == 422 and "no upload" in response.json()["error"]["message"]
