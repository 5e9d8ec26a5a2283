"""`vidsynth serve`: the job API (/v1/videos), its event streams, and the web page, in one FastAPI app.

The model is loaded once; one worker thread runs jobs from the SQLite queue (`jobs.py`, `worker.py`). Requests
are validated by the same GenerationRequest as the CLI and the Python API. Errors are JSON:
{"error": {"code", "message", "field", "fields": [{"field", "message"}]}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import secrets
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from . import __version__
from .devices import dtype_name
from .errors import InputError, RequestError, UsageError, WriteError
from .jobs import (CANCELED, COMPLETED, FAILED, FINISHED, IN_PROGRESS, QUEUED, UPLOAD_TYPES, VARIANTS,
                   IdempotencyConflict, JobStore)
from .request import DEFAULT_STRENGTH, MAX_SIDE, PRESETS, SCHEDULERS, GenerationRequest, field_errors
from .video import read_frames
from .worker import TERMINAL_EVENTS, EventLog, Worker, with_start_file

TOKEN_COOKIE = "vidsynth_token"
KEEPALIVE_SECONDS = 15.0
SHUTDOWN_GRACE_SECONDS = 5  # what requests in flight get to finish once the server is told to stop
EVENT_RECHECK_SECONDS = 1.0  # streams wake on changes (JobChanges); this bounds a missed one
UNREADABLE_JOB = {"status": None}  # what a stream knows of its job while the database fails: keep-alives go on


@dataclass
class ServerSettings:
    data_dir: Path
    model: Optional[str] = None
    runtime: dict = field(default_factory=dict)  # keyword arguments of vidsynth.load: device, dtype, offload, ...
    token: Optional[str] = None
    max_queue: int = 100  # queued jobs beyond this get 429
    keep_jobs: int = 500  # finished jobs (and their files) kept; older ones are deleted
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 64 * 2**20  # a start video or image sent to /v1/uploads


# The shapes of the API's answers, for its OpenAPI description (/docs): the routes return the job store's dicts.

class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    """A video job, as every route that returns one gives it."""

    id: str
    object: Literal["video"]
    status: Literal["queued", "in_progress", "completed", "failed", "canceled"]
    progress: float = Field(description="0-100")
    phase: Optional[str] = Field(description="while it runs: encode, encode_video, denoise, decode or write")
    queue_position: Optional[int] = Field(description="jobs ahead of it, while it is queued")
    outputs: int = Field(description="videos it makes")
    created_at: float = Field(description="unix seconds, as the other times")
    started_at: Optional[float]
    completed_at: Optional[float]
    attempts: int = Field(description="runs started, counting those the server died during")
    cancel_requested: bool
    request: dict[str, Any] = Field(description="the GenerationRequest, with the model's defaults and the seed "
                                                "filled in")
    warnings: list[str] = Field(description="what the generation warned of: words the model never saw, "
                                            "the low-memory mode")
    error: Optional[JobError]


class JobList(BaseModel):
    object: Literal["list"]
    data: list[Job]
    has_more: bool
    last_id: Optional[str] = Field(description="pass as `after` for the next page")


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: Optional[str] = Field(description="the request field it is about, if one")
    fields: list[FieldError] = Field(description="every bad field, for a 422")


class ErrorBody(BaseModel):
    error: ErrorDetail


def errors(*statuses: int) -> dict:
    return {status: {"model": ErrorBody} for status in statuses}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None, headers=None):
        super().__init__(status, message, headers=headers)
        self.code, self.field = code, field


def _error_response(status: int, code: str, message: str, field: Optional[str] = None, fields=None, headers=None):
    """`message` is about `field` (the first of `fields`, when several are wrong); the top-level message names it."""
    if fields is None:
        fields = [{"field": field, "message": message}] if field else []
    error = {"code": code, "message": f"{field}: {message}" if field else message, "field": field, "fields": fields}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _body_error(request: Request, error: dict) -> JSONResponse:
    """A body that is no JSON object at all: what to send, rather than how parsing it failed. `curl -d` without
    `-H 'Content-Type: application/json'` sends a form, which FastAPI does not read as JSON."""
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "unreadable")
        return _error_response(422, "invalid_request", f"not valid JSON ({reason} at character {error['loc'][-1]})",
                               "body")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if error["type"] != "missing" and content_type != "application/json" and not content_type.endswith("+json"):
        return _error_response(415, "unsupported_media_type", f"send the settings as JSON, with Content-Type: "
                               f"application/json (not {content_type or 'none'})", "body")
    return _error_response(422, "invalid_request", 'send the settings as a JSON object, such as {"prompt": "a red '
                                                   'circle"}', "body")


def create_app(settings: ServerSettings, pipeline=None) -> FastAPI:
    """The app. `pipeline` is loaded from `settings.model` at start-up unless one is given."""
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal pipeline
        if pipeline is None:
            from .pipeline import load
            pipeline = await asyncio.to_thread(load, settings.model, **settings.runtime)
        store = JobStore(settings.data_dir)
        store.recover()
        events = EventLog(store.changes)
        worker = Worker(pipeline, store, events, settings.keep_jobs)
        # Event ids are "RUN.N": N counts a job's events in this process's log, which a restart starts anew.
        state.update(store=store, events=events, worker=worker, run=secrets.token_hex(4))
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            store.close()

    app = FastAPI(title="vidsynth", version=__version__, lifespan=lifespan, responses=errors(401, 413, 422),
                  description="Text-to-video jobs: submit, watch progress, fetch the video.")

    # ------------------------------------------------------------------------------------------- guards and errors

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method in ("POST", "PUT", "PATCH"):
            limit = settings.max_upload_bytes if request.url.path == "/v1/uploads" else settings.max_body_bytes
            if length is None and request.headers.get("transfer-encoding"):
                return _error_response(411, "length_required", "send a Content-Length header")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return _error_response(413, "body_too_large", f"request body over {limit} bytes")
        if settings.token and request.url.path != "/healthz":
            if request.url.path == "/" and _same(request.query_params.get("token", ""), settings.token):
                # A link with ?token= signs the browser in: the cookie lets <video src> and the page's requests through.
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict")
                return response
            if not _authorised(request, settings.token):
                return _error_response(401, "unauthorized", "send Authorization: Bearer <token>",
                                       headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        whole_body = [error for error in errors if error["loc"] == ("body",) or error["type"] == "json_invalid"]
        if whole_body:
            return _body_error(request, whole_body[0])
        fields = field_errors(errors)
        first = fields[0]
        return _error_response(422, "invalid_request", first["message"], first["field"], fields)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = getattr(exc, "code", {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error"))
        return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "field", None), headers=exc.headers)

    @app.exception_handler(WriteError)
    async def write_error(request: Request, exc: WriteError):
        # The reason only (a full disk): the server's paths are its own business.
        return _error_response(507, exc.code, f"the server could not store what this request needs: {exc.reason}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Answered in the API's error shape; the exception still reaches the server's log with its traceback.
        return _error_response(500, "internal_error", "the server failed on this request; its log says why")

    def job_or_404(job_id: str) -> dict:
        job = state["store"].get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no video job {job_id!r}")
        return job

    # --------------------------------------------------------------------------------------------------- the API

    @app.get("/healthz", tags=["server"])
    def healthz():
        store = state["store"]
        try:
            queued = store.queued_count()
        except sqlite3.Error:  # a failing disk: the status says so
            queued = None
        return {"status": store.check_room(), "version": __version__, "model": pipeline.name,
                "device": str(pipeline.device), "dtype": dtype_name(pipeline.dtype), "queued": queued,
                "running": state["worker"].current, "ready": not state["worker"].warming_up}

    @app.post("/v1/videos", status_code=202, tags=["videos"], response_model=Job,
              responses=errors(409, 415, 429, 507))
    def create_video(body: GenerationRequest, idempotency_key: Optional[str] = Header(None, max_length=255)):
        """Queue a generation. The request's unset fields take the model's defaults; a missing seed is drawn now."""
        store = state["store"]
        replay = idempotency_key is not None and store.find_by_key(idempotency_key) is not None
        if not replay and store.queued_count() >= settings.max_queue:
            raise ApiError(429, "queue_full", f"{settings.max_queue} jobs are waiting; try again later",
                           headers={"Retry-After": "10"})
        try:
            resolved = pipeline.prepare(with_start_file(body, store))
        except RequestError as exc:
            raise ApiError(422, "invalid_request", exc.message, exc.field) from None
        resolved = resolved.model_copy(update={"init_video": body.init_video})  # the job records the id, not a path
        try:
            job, created = store.create(resolved.model_dump(mode="json"), resolved.total_videos, idempotency_key,
                                        submitted=body.model_dump(mode="json", exclude_unset=True))
        except IdempotencyConflict:
            raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used with a different request") from None
        if created:
            state["worker"].wake()
        return JSONResponse(job, status_code=202, headers={} if created else {"Idempotent-Replayed": "true"})

    @app.post("/v1/uploads", status_code=201, tags=["uploads"], responses=errors(415, 507))
    async def upload_start_video(request: Request):
        """A video or image for jobs to start from (their `init_video` is the id this returns): the file itself as the
        body, its type as Content-Type. Kept as long as jobs are (`--keep-jobs` uploads at most)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in UPLOAD_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"send the video or image as one of {', '.join(UPLOAD_TYPES)}")
        data = await request.body()
        if not data:
            raise ApiError(422, "invalid_request", "is empty: send the file", "body")
        upload_id, path = await asyncio.to_thread(state["store"].add_upload, data, content_type)
        try:
            first, _ = await asyncio.to_thread(read_frames, path, 1)
        except InputError:
            path.unlink(missing_ok=True)
            raise ApiError(422, "invalid_request", f"is not a readable {content_type} file", "body") from None
        height, width = first.shape[1:3]
        if max(height, width) > MAX_SIDE:
            path.unlink(missing_ok=True)
            raise ApiError(422, "invalid_request", f"frames of {width}x{height}; at most {MAX_SIDE} a side", "body")
        await asyncio.to_thread(state["store"].prune, settings.keep_jobs)  # only once it is known to be good
        return {"id": upload_id, "object": "upload", "content_type": content_type, "bytes": len(data),
                "width": width, "height": height}

    @app.get("/v1/videos", tags=["videos"], response_model=JobList)
    def list_videos(limit: int = Query(20, ge=1, le=100), after: Optional[str] = Query(None, max_length=64)):
        """Jobs, newest first. Pass the last id of a page as `after` for the next page."""
        try:
            jobs, has_more = state["store"].list(limit, after)
        except KeyError:
            raise ApiError(422, "invalid_request", f"no video job {after!r}", "after") from None
        return {"object": "list", "data": jobs, "has_more": has_more, "last_id": jobs[-1]["id"] if jobs else None}

    @app.get("/v1/videos/{job_id}", tags=["videos"], response_model=Job, responses=errors(404))
    def get_video(job_id: str):
        return job_or_404(job_id)

    @app.delete("/v1/videos/{job_id}", tags=["videos"], responses=errors(404))
    def delete_video(job_id: str):
        """Delete a job and its files; a running job is stopped first."""
        job_or_404(job_id)
        state["store"].delete(job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    @app.post("/v1/videos/{job_id}/cancel", tags=["videos"], response_model=Job, responses=errors(404, 409))
    def cancel_video(job_id: str):
        """A queued job never starts; a running one stops within one denoising step."""
        job = job_or_404(job_id)
        if job["status"] in (COMPLETED, FAILED):
            raise ApiError(409, "not_cancelable", f"the job has already {job['status']}")
        job = state["store"].request_cancel(job_id)
        if job["status"] == CANCELED:
            state["events"].publish(job_id, CANCELED)
        return job

    @app.get("/v1/videos/{job_id}/content", tags=["videos"], responses=errors(404, 409))
    @app.head("/v1/videos/{job_id}/content", include_in_schema=False)  # one operation in the API's description
    def video_content(job_id: str, variant: Literal[tuple(VARIANTS)] = "video", index: int = Query(0, ge=0)):
        """The finished video (mp4), a thumbnail (png, the middle frame) or an animated gif. Answers Range requests,
        and HEAD (the headers alone: a download tool's first question)."""
        job = job_or_404(job_id)
        if job["status"] != COMPLETED:
            raise ApiError(409, "not_ready", f"the job is {job['status']}; content exists once it has completed")
        if index >= job["outputs"]:
            raise ApiError(422, "invalid_request", f"this job made {job['outputs']} video(s)", "index")
        path = state["store"].output_path(job_id, index, variant)
        if not path.is_file():
            raise ApiError(404, "not_found", "the file is gone (deleted by retention)")
        extension, media_type = VARIANTS[variant]
        return FileResponse(path, media_type=media_type, filename=f"{job_id}-{index}.{extension}",
                            content_disposition_type="inline")

    @app.get("/v1/videos/{job_id}/events", tags=["videos"], responses=errors(404))
    async def video_events(job_id: str, last_event_id: Optional[str] = Header(None)):
        """Server-sent events: queued, started, warning, step, decoding, encoding, then completed, failed or
        canceled. The job's own events carry ids; a client reconnecting with `Last-Event-ID` (as EventSource does)
        gets only the ones after it, or all of them if the id is from before the server restarted."""
        job_or_404(job_id)
        run, _, count = (last_event_id or "").partition(".")
        start = int(count) if run == state["run"] and count.isdigit() else 0
        return StreamingResponse(_event_stream(job_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _event_stream(job_id: str, index: int):
        store, events = state["store"], state["events"]
        last_position, announced_running, seen_running_without_events = None, False, False
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            change = store.changes.watch(job_id)
            new_events = events.since(job_id, index)
            for event in new_events:
                index += 1
                announced_running = True
                last_sent = loop.time()
                yield _sse(event, f"{state['run']}.{index}")
                if event["event"] in TERMINAL_EVENTS:
                    return
            if new_events:  # the job is running here and said so itself: nothing to ask the database
                await store.changes.wait(job_id, change, EVENT_RECHECK_SECONDS)
                continue
            try:
                job = store.get(job_id)
            except sqlite3.Error:  # a failing disk: the worker's events still come here; the database is asked again
                job = UNREADABLE_JOB
            if job is None:
                yield _sse({"event": "deleted", "id": job_id, "time": time.time()})
                return
            if job["status"] in FINISHED:
                if events.since(job_id, index):
                    continue  # the worker's own final event arrived meanwhile
                yield _sse({"event": job["status"], "id": job_id, "time": job["completed_at"], "error": job["error"]})
                return
            if job["status"] == QUEUED and job["queue_position"] != last_position:
                last_position = job["queue_position"]
                last_sent = loop.time()
                yield _sse({"event": "queued", "id": job_id, "time": time.time(), "queue_position": last_position})
            elif job["status"] == IN_PROGRESS and not announced_running:
                # Running without events: either the worker has claimed it and is about to say so (wait for that),
                # or its events were dropped from the log (seen again at the next look): say where it is.
                if seen_running_without_events:
                    announced_running = True
                    yield _sse({"event": "started", "id": job_id, "time": job["started_at"],
                                "progress": job["progress"], "phase": job["phase"]})
                seen_running_without_events = True
            if loop.time() - last_sent > KEEPALIVE_SECONDS:
                last_sent = loop.time()
                yield ": keep-alive\n\n"
            await store.changes.wait(job_id, change, EVENT_RECHECK_SECONDS)

    # -------------------------------------------------------------------------------------------------- the page

    web = resources.files("vidsynth") / "web"
    app.mount("/static", StaticFiles(directory=str(web)), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(str(web / "index.html"), media_type="text/html")

    def preset_settings(name: str) -> dict:
        """What preset `name` sets for this model: the request's own resolution, so the page shows what a job gets."""
        resolved = GenerationRequest(prompt="", allow_empty_prompt=True, preset=name).resolve(pipeline.defaults)
        return {field: getattr(resolved, field) for field in ("steps", "scheduler", "cache_interval",
                                                              "guidance_fraction")}

    @app.get("/v1/settings", tags=["server"])
    def request_settings():
        """What the page's form needs: the model's defaults, the schedulers, the presets and what each sets for this
        model, the request schema with its limits, and the words of the model's training captions (null for a model
        vidsynth did not train)."""
        defaults = {**pipeline.defaults.as_dict(), "strength": DEFAULT_STRENGTH}
        vocabulary = pipeline.components.vocabulary
        return {"model": pipeline.name, "defaults": defaults, "schedulers": list(SCHEDULERS),
                "presets": list(PRESETS), "preset_settings": {name: preset_settings(name) for name in PRESETS},
                "schema": GenerationRequest.model_json_schema(),
                "vocabulary": sorted(vocabulary) if vocabulary is not None else None}

    return app


def _sse(event: dict, event_id: Optional[str] = None) -> str:
    """One server-sent event, with an id if it is one of the job's logged events."""
    identity = f"id: {event_id}\n" if event_id is not None else ""
    return f"{identity}event: {event['event']}\ndata: {json.dumps(event)}\n\n"


def _authorised(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and _same(given.strip(), token):
        return True
    return _same(request.cookies.get(TOKEN_COOKIE, ""), token)


def _same(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode(), token.encode())


def check_can_listen(host: str, port: int) -> None:
    """Refuse an address that cannot be listened on (a port in use, a host not on this machine) now, before the
    model loads: minutes for a full-size model, after which uvicorn would only then find out."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a socket in TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          pipeline=None) -> None:
    """Run the server until interrupted; `pipeline` as for `create_app`."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    # The worker's messages (compiling, failed jobs) printed as uvicorn prints its own.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["vidsynth"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    # Event streams never end by themselves while their job waits or runs (an open page holds one): without a bound
    # on the wait for connections to close, Ctrl-C would wait for every watched job. After it they are cut, and the
    # worker stops, putting a running job back in the queue.
    uvicorn.run(create_app(settings, pipeline), host=host, port=port, log_level=log_level, log_config=log_config,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
