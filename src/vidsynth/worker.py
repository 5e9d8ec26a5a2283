"""The server's worker: one thread per device takes queued jobs one at a time, runs them through the pipeline and
writes their files; and the in-memory event log that the server streams to clients as server-sent events.

Progress and warnings arrive through the same `Event` callback the CLI's progress bar uses; the callback also checks
the job's cancel flag, so a cancel or delete stops a running job within one denoising step.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Optional

from PIL import Image

from .errors import Cancelled, VidsynthError, WriteError
from .events import Event
from .files import refused_write_reason
from .jobs import CANCELED, COMPLETED, FAILED, JobChanges, JobStore
from .request import GenerationRequest
from .video import write_video

log = logging.getLogger("vidsynth.server")
TERMINAL_EVENTS = (COMPLETED, FAILED, CANCELED)
DATABASE_RETRY_SECONDS = 5.0  # how often the worker tries again a job-database operation that failed
# What the job database raises on a full disk (WriteError) or a failing one: the worker waits these out.
DATABASE_FAILURES = (WriteError, sqlite3.Error)
# Event names clients see, by pipeline phase.
EVENT_NAMES = {"encode_video": "start_video", "denoise": "step", "decode": "decoding", "write": "encoding"}


class EventLog:
    """What happened to each recent job, in order, for the event streams. Bounded: old jobs' logs are dropped."""

    def __init__(self, changes: JobChanges, jobs_kept: int = 256):
        self._changes = changes
        self._events: OrderedDict[str, list[dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._jobs_kept = jobs_kept

    def publish(self, job_id: str, name: str, **data) -> None:
        with self._lock:
            events = self._events.setdefault(job_id, [])
            self._events.move_to_end(job_id)
            events.append({"event": name, "id": job_id, "time": time.time(), **data})
            while len(self._events) > self._jobs_kept:
                self._events.popitem(last=False)
        self._changes.notify(job_id)

    def since(self, job_id: str, index: int) -> list[dict]:
        with self._lock:
            return list(self._events.get(job_id, ())[index:])


def with_start_file(request: GenerationRequest, store: JobStore) -> GenerationRequest:
    """The request with the upload or job it names to start from (video-to-video, by id) replaced by its file."""
    if request.init_video is None:
        return request
    return request.model_copy(update={"init_video": str(store.start_video(request.init_video))})


class ServerStopping(Exception):
    """Raised from the progress callback when the server shuts down mid-job; the job goes back to the queue."""


class Worker:
    def __init__(self, pipeline, store: JobStore, events: EventLog, keep_jobs: int):
        self.pipeline, self.store, self.events, self.keep_jobs = pipeline, store, events, keep_jobs
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vidsynth-worker", daemon=True)
        self.current: Optional[str] = None
        self._unsaved_progress: Optional[str] = None  # the job whose progress the database refused
        self._queue_failing = False
        self.warming_up = pipeline.compiled  # compiling for the model's own video before the first job

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        """A job was submitted."""
        self._wake.set()

    def _loop(self) -> None:
        if self.warming_up:
            self._warm_up()
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
            except Exception as exc:  # a full disk, a failing one: the queue waits rather than losing its worker
                if not self._queue_failing:  # said once, not every few seconds
                    log.error("cannot take the next job (trying again every %.0f s): %s", DATABASE_RETRY_SECONDS,
                              exc, exc_info=not isinstance(exc, WriteError))
                self._queue_failing = True
                self._stopping.wait(DATABASE_RETRY_SECONDS)
                continue
            if self._queue_failing:
                log.info("taking jobs again")
                self._queue_failing = False
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.current = job["id"]
            try:
                self._run(job)
            except Exception:  # never let one job take the worker down
                log.exception("job %s crashed the worker loop", job["id"])
            finally:
                self.current = None
            try:
                self.store.prune(self.keep_jobs)
            except Exception:  # housekeeping: the next job's end tries again
                log.exception("could not delete old jobs")

    def _warm_up(self) -> None:
        """A compiled UNet compiles on its first video of a shape, minutes for a full-size model: do it for the
        model's own video before taking jobs, so a user's first job does not wait on it (queued jobs wait instead)."""
        def stop_check(event: Event) -> None:
            if self._stopping.is_set():
                raise ServerStopping()

        log.info("compiling the UNet for the model's own video; jobs start when it is done")
        started = time.monotonic()
        try:
            self.pipeline.warm_up(stop_check)
            log.info("compiled in %.0f s", time.monotonic() - started)
        except ServerStopping:
            pass
        except Exception:  # jobs then compile on their own, or fail with the reason
            log.exception("compiling ahead of the first job failed")
        finally:
            self.warming_up = False

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        self.events.publish(job_id, "started", attempt=job["attempts"])
        request = GenerationRequest.model_validate(job["request"])

        def on_event(event: Event) -> None:
            if self._stopping.is_set():
                raise ServerStopping()
            if self._best_effort(self.store.cancel_requested, job_id):
                raise Cancelled("canceled")
            if event.message:
                self._best_effort(self.store.add_warning, job_id, event.message)
                self.events.publish(job_id, "warning", message=event.message)
                return
            self._best_effort(self.store.set_progress, job_id, event.progress, event.phase)
            if event.phase in EVENT_NAMES:
                self.events.publish(job_id, EVENT_NAMES[event.phase], step=event.step, total=event.total,
                                    video=event.video, videos=event.videos, progress=round(event.progress * 100, 1))

        try:
            videos = self.pipeline.generate(with_start_file(request, self.store), on_event)
            if request.init_video is not None:
                for video in videos:
                    video.settings["init_video"] = request.init_video  # the job id, as the job records it
            on_event(Event("write", 0, 1, len(videos) - 1, len(videos)))
            self._write_outputs(job_id, videos)
        except ServerStopping:
            self._record(self.store.requeue, job_id)
            return
        except Cancelled:
            self._finish(job_id, CANCELED)
            return
        except VidsynthError as exc:
            self._finish(job_id, FAILED, (exc.code, str(exc)))
            return
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._finish(job_id, FAILED, ("internal_error", f"{type(exc).__name__}: {exc}"))
            return
        self._finish(job_id, COMPLETED)

    def _finish(self, job_id: str, status: str, error: Optional[tuple[str, str]] = None) -> None:
        shutil.rmtree(self.store.videos_dir / f".{job_id}.partial", ignore_errors=True)
        found = self._record(self.store.finish, job_id, status, error)
        if found is False:  # deleted while it ran or its files were being written: their streams say so
            shutil.rmtree(self.store.videos_dir / job_id, ignore_errors=True)
        elif found:
            details = {"error": {"code": error[0], "message": error[1]}} if error else {}
            self.events.publish(job_id, status, **details)

    def _best_effort(self, operation, job_id: str, *args):
        """Read or note a running job's state where the database allows. A full or failing disk does not stop the
        job: its events still reach the streams, and its result waits for the database (`_record`). None if it
        failed."""
        try:
            return operation(job_id, *args)
        except DATABASE_FAILURES as exc:
            if self._unsaved_progress != job_id:  # once per job, not once per step
                self._unsaved_progress = job_id
                log.warning("job %s goes on without the job database, its progress unsaved: %s", job_id, exc)
            return None

    def _record(self, write, job_id: str, *args) -> Optional[bool]:
        """Write a job's new state, waiting while the database cannot take it (a full or failing disk), so that a
        finished job's result is never dropped. Returns what `write` returns (`finish`: whether the job was there), or
        None if the server stops first: the restarted server then finds the job in progress and runs it again."""
        waiting = False
        while True:
            try:
                return write(job_id, *args)
            except DATABASE_FAILURES as exc:
                if self._stopping.is_set():
                    log.warning("job %s: %s", job_id, exc)
                    return None
                if not waiting:
                    waiting = True
                    log.warning("job %s waits for the job database to record its result: %s", job_id, exc)
                    self.events.publish(job_id, "warning", message=_waiting_for_the_database(exc))
            if self._stopping.wait(DATABASE_RETRY_SECONDS):
                return None

    def _write_outputs(self, job_id: str, videos) -> None:
        """All files into a hidden folder, renamed into place at once: a job's files are all there or none are. A
        failed write fails the job with the system's reason (a full disk), not the server's paths."""
        partial = self.store.videos_dir / f".{job_id}.partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            for index, video in enumerate(videos):
                write_video(partial / f"{index}.mp4", video.frames, video.fps, video.settings, sidecar=False)
                write_video(partial / f"{index}.gif", video.frames, video.fps, video.settings, sidecar=False)
                Image.fromarray(video.frames[len(video.frames) // 2]).save(partial / f"{index}.png")
            final = self.store.videos_dir / job_id
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        except Exception as exc:
            reason = refused_write_reason(exc)
            if reason is None:
                raise
            raise WriteError(f"could not write this job's videos: {reason}", reason) from exc


def _waiting_for_the_database(failure: Exception) -> str:
    if isinstance(failure, WriteError):
        return "the server's disk is full: this job's result is recorded once there is room"
    return f"the server's job database failed ({failure}): this job's result is recorded once it works again"
