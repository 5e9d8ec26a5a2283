"""The server's job queue: jobs in SQLite (WAL) under the data folder, their videos in files beside it.

A job is a resolved GenerationRequest plus its state. The database is the truth: a job is claimed by a single
UPDATE, so a restarted server finds every job where it was left. Jobs that were running when the process died are
queued again (up to MAX_ATTEMPTS times, then failed with that reason), never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

from .errors import InputError, RequestError, WriteError
from .files import atomic_file

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELED = "queued", "in_progress", "completed", "failed", "canceled"
FINISHED = (COMPLETED, FAILED, CANCELED)
MAX_ATTEMPTS = 3  # runs a job gets when the server keeps dying under it
JOB_ID = re.compile(r"^video_[0-9a-f]{24}$")
UPLOAD_ID = re.compile(r"^upload_[0-9a-f]{24}$")
# What a start video may be uploaded as, by Content-Type, and the extension it is stored under (PyAV reads them all).
UPLOAD_TYPES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "image/gif": ".gif",
                "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
VARIANTS = {"video": ("mp4", "video/mp4"), "thumbnail": ("png", "image/png"), "gif": ("gif", "image/gif")}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    outputs INTEGER NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    phase TEXT,
    error_code TEXT,
    error_message TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    request_digest TEXT,
    warnings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS room_probe (filler BLOB);
"""


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request."""


class JobChanges:
    """Wakes the server's event streams (asyncio tasks) when what they report may have changed, from whichever
    thread changed it: a job's own events wake its streams; a status change or a deletion wakes them all, since it
    moves queue positions. Streams wait on this rather than poll the database: on a 2-core machine 200 streams
    polling every 50 ms slowed the job they watched 1.45-1.49x, waiting 1.18-1.25x (BENCHMARKS.md, "Event streams
    watching a job")."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, set[asyncio.Future]] = {}

    def watch(self, job_id: str) -> asyncio.Future:
        """A future that the next change to `job_id` (or to every job) completes. Take it before reading the state,
        then `wait` for it, so that no change between the two is missed."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(future)
        return future

    async def wait(self, job_id: str, future: asyncio.Future, timeout: float) -> None:
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:  # not the builtin on Python 3.10
            pass
        finally:
            with self._lock:
                waiting = self._waiting.get(job_id)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiting[job_id]

    def notify(self, job_id: Optional[str] = None) -> None:
        """Wake the streams of `job_id`, or of every job."""
        with self._lock:
            if job_id is None:
                futures = [future for waiting in self._waiting.values() for future in waiting]
                self._waiting.clear()
            else:
                futures = self._waiting.pop(job_id, ())
        for future in futures:
            try:
                future.get_loop().call_soon_threadsafe(_complete, future)
            except RuntimeError:  # its event loop has closed: the server is gone
                pass


def _is_full(error: sqlite3.DatabaseError) -> bool:
    """Whether SQLite failed for want of space (SQLITE_FULL: the disk, or the database's page limit)."""
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    return code == sqlite3.SQLITE_FULL if code is not None else "database or disk is full" in str(error)


def _complete(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class JobStore:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.videos_dir = self.data_dir / "videos"
        self.videos_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = self.data_dir / "uploads"
        self.uploads_dir.mkdir(exist_ok=True)
        self.changes = JobChanges()
        # One connection shared by the worker thread and the request handlers, serialised by a lock: SQLite
        # writes are serial anyway, and every statement here is short.
        path = self.data_dir / "jobs.sqlite3"
        self._lock = threading.Lock()
        # "disk_full" from a write refused for want of room until `check_room` finds room; "database_error" from any
        # other failure of the database (a failing disk) until a statement succeeds; else "ok".
        self.health = "ok"
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            if "warnings" not in {column["name"] for column in self._db.execute("PRAGMA table_info(jobs)")}:
                self._db.execute("ALTER TABLE jobs ADD COLUMN warnings TEXT")  # a data folder from before warnings
        except sqlite3.DatabaseError as exc:  # not SQLite's, damaged, read-only, on a full disk...
            raise InputError(f"cannot use the job database {path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _database(self):
        """The connection, for one thread at a time. A database that cannot grow (a full disk) raises WriteError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.DatabaseError as exc:
                if not _is_full(exc):
                    self.health = "database_error"
                    raise
                self.health = "disk_full"
                raise WriteError(f"could not write the job database: {exc}", str(exc)) from exc
            if self.health == "database_error":
                self.health = "ok"

    def check_room(self) -> str:
        """The health, once more checked if the database had no room: a row of a page's size is stored and deleted.
        Any other write proves nothing: one in place (a job's progress) can succeed while the database cannot grow."""
        if self.health == "disk_full":
            with contextlib.suppress(WriteError, sqlite3.DatabaseError), self._database() as database:
                page_size = database.execute("PRAGMA page_size").fetchone()[0]
                database.execute("INSERT INTO room_probe (filler) VALUES (zeroblob(?))", (page_size,))
                database.execute("DELETE FROM room_probe")
                self.health = "ok"
        return self.health

    def _query(self, sql: str, parameters=()) -> list[sqlite3.Row]:
        with self._database() as database:
            return database.execute(sql, parameters).fetchall()

    # ------------------------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> Optional[dict]:
        if not JOB_ID.match(job_id):
            return None
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list(self, limit: int, after: Optional[str] = None) -> tuple[list[dict], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        if after is not None:
            rows = self._query("SELECT seq FROM jobs WHERE id = ?", (after,))
            if not rows:
                raise KeyError(after)
            found = self._query("SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?", (rows[0]["seq"], limit + 1))
        else:
            found = self._query("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit + 1,))
        return [self._job(row) for row in found[:limit]], len(found) > limit

    def find_by_key(self, idempotency_key: str) -> Optional[dict]:
        rows = self._query("SELECT id FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
        return self.get(rows[0]["id"]) if rows else None

    def queued_count(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM jobs WHERE status = ?", (QUEUED,))[0]["n"]

    def output_path(self, job_id: str, index: int, variant: str) -> Path:
        extension, _ = VARIANTS[variant]
        return self.videos_dir / job_id / f"{index}.{extension}"

    def start_video(self, reference: str) -> Path:
        """The file that a request names to start from: an upload's id, or a finished job's ('ID', its first video,
        or 'ID/INDEX'). Over HTTP a request names only files made or received here, never a path: the server reads
        no other file on a client's word."""
        if UPLOAD_ID.match(reference):
            found = [path for path in self.uploads_dir.glob(f"{reference}.*") if path.suffix in UPLOAD_TYPES.values()]
            if not found:
                raise RequestError("init_video", f"no upload {reference!r} (uploads are kept as long as jobs)")
            return found[0]
        job_id, _, index = reference.partition("/")
        if not JOB_ID.match(job_id) or not (index == "" or index.isdigit()):
            raise RequestError("init_video", "give the id of an upload or of a completed job on this server ('ID', "
                                             "or 'ID/INDEX' for another of a job's videos); files on the server are "
                                             "not read over HTTP")
        job = self.get(job_id)
        if job is None:
            raise RequestError("init_video", f"no video job {job_id!r}")
        if job["status"] != COMPLETED:
            raise RequestError("init_video", f"job {job_id} is {job['status']}; start from a completed one")
        if int(index or 0) >= job["outputs"]:
            raise RequestError("init_video", f"job {job_id} made {job['outputs']} video(s), numbered from 0")
        path = self.output_path(job_id, int(index or 0), "video")
        if not path.is_file():
            raise RequestError("init_video", f"the video of job {job_id} is gone (deleted by retention)")
        return path

    def _job(self, row: sqlite3.Row) -> dict:
        job = {
            "id": row["id"], "object": "video", "status": row["status"], "progress": round(row["progress"] * 100, 1),
            "phase": row["phase"], "queue_position": None, "outputs": row["outputs"],
            "created_at": row["created_at"], "started_at": row["started_at"], "completed_at": row["completed_at"],
            "attempts": row["attempts"], "cancel_requested": bool(row["cancel_requested"]),
            "request": json.loads(row["request"]), "warnings": json.loads(row["warnings"] or "[]"), "error": None,
        }
        if row["status"] == QUEUED:
            ahead = self._query("SELECT COUNT(*) AS n FROM jobs WHERE status = ? AND seq < ?", (QUEUED, row["seq"]))
            job["queue_position"] = ahead[0]["n"]
        if row["error_code"]:
            job["error"] = {"code": row["error_code"], "message": row["error_message"]}
        return job

    # ------------------------------------------------------------------------------------------------- writing

    def create(self, request: dict, outputs: int, idempotency_key: Optional[str] = None,
               submitted: Optional[dict] = None) -> tuple[dict, bool]:
        """A new queued job, or (with a known idempotency key) the job it made before. Returns (job, created).

        `submitted` is the request as the client sent it (before defaults and a drawn seed): a retry must match it.
        """
        digest = hashlib.sha256(json.dumps(submitted or request, sort_keys=True).encode()).hexdigest()
        job_id = f"video_{secrets.token_hex(12)}"
        with self._database() as database:
            found = None
            if idempotency_key is not None:
                found = database.execute("SELECT id, request_digest FROM jobs WHERE idempotency_key = ?",
                                         (idempotency_key,)).fetchone()
            if found is not None:
                if found["request_digest"] != digest:
                    raise IdempotencyConflict(idempotency_key)
            else:
                database.execute(
                    "INSERT INTO jobs (id, status, request, outputs, created_at, idempotency_key, request_digest) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, QUEUED, json.dumps(request), outputs, time.time(), idempotency_key, digest))
        if found is not None:  # read outside the lock: get() takes it too
            return self.get(found["id"]), False
        return self.get(job_id), True

    def claim_next(self) -> Optional[dict]:
        """Mark the oldest queued job in progress and return it (None when the queue is empty)."""
        with self._database() as database:
            row = database.execute(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1, progress = 0, phase = NULL, "
                "warnings = NULL WHERE seq = (SELECT seq FROM jobs WHERE status = ? ORDER BY seq LIMIT 1) RETURNING id",
                (IN_PROGRESS, time.time(), QUEUED)).fetchone()
        if row is None:
            return None
        self.changes.notify()
        return self.get(row["id"])

    def set_progress(self, job_id: str, progress: float, phase: str) -> None:
        self._query("UPDATE jobs SET progress = ?, phase = ? WHERE id = ? AND status = ?",
                    (progress, phase, job_id, IN_PROGRESS))

    def add_warning(self, job_id: str, message: str) -> None:
        """Keep a warning the running job's generation gave (words the model never saw, the low-memory mode...)."""
        with self._database() as database:
            row = database.execute("SELECT warnings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                kept = json.loads(row["warnings"] or "[]") + [message]
                database.execute("UPDATE jobs SET warnings = ? WHERE id = ?", (json.dumps(kept), job_id))

    def finish(self, job_id: str, status: str, error: Optional[tuple[str, str]] = None) -> bool:
        """Record how a job ended. False if it is gone (deleted)."""
        code, message = error or (None, None)
        progress_sql = "1" if status == COMPLETED else "progress"
        with self._database() as database:
            found = database.execute(
                f"UPDATE jobs SET status = ?, progress = {progress_sql}, error_code = ?, error_message = ?, "
                "completed_at = ? WHERE id = ?", (status, code, message, time.time(), job_id)).rowcount > 0
        self.changes.notify()
        return found

    def requeue(self, job_id: str) -> None:
        """Put back a job the server stopped under on purpose (shutdown); that run does not count as an attempt."""
        self._query("UPDATE jobs SET status = ?, progress = 0, phase = NULL, attempts = attempts - 1 "
                    "WHERE id = ? AND status = ?", (QUEUED, job_id, IN_PROGRESS))
        self.changes.notify()

    def request_cancel(self, job_id: str) -> Optional[dict]:
        """Cancel a queued job at once; flag a running one (the worker stops it at its next step)."""
        self._query("UPDATE jobs SET status = ?, completed_at = ?, error_code = NULL WHERE id = ? AND status = ?",
                    (CANCELED, time.time(), job_id, QUEUED))
        self._query("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?", (job_id, IN_PROGRESS))
        self.changes.notify()
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._query("SELECT cancel_requested, status FROM jobs WHERE id = ?", (job_id,))
        return not rows or bool(rows[0]["cancel_requested"])  # a deleted job is as good as canceled

    def delete(self, job_id: str) -> bool:
        """Remove a job and its files. A running job is flagged to stop first; its worker cleans up after it."""
        self._query("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        with self._database() as database:
            deleted = database.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
        shutil.rmtree(self.videos_dir / job_id, ignore_errors=True)
        self.changes.notify()
        return bool(deleted)

    def recover(self) -> list[str]:
        """After a restart: queue again the jobs that were running, or fail those that keep dying. Returns their ids."""
        interrupted = self._query("SELECT id, attempts FROM jobs WHERE status = ?", (IN_PROGRESS,))
        for row in interrupted:
            shutil.rmtree(self.videos_dir / row["id"], ignore_errors=True)  # whatever a dead run left is not served
            if row["attempts"] >= MAX_ATTEMPTS:
                self.finish(row["id"], FAILED, ("interrupted", f"the server stopped while this job ran, "
                                                               f"{row['attempts']} times; submit it again"))
            elif self._query("SELECT cancel_requested FROM jobs WHERE id = ?", (row["id"],))[0]["cancel_requested"]:
                self.finish(row["id"], CANCELED)
            else:
                self._query("UPDATE jobs SET status = ?, progress = 0, phase = NULL WHERE id = ?", (QUEUED, row["id"]))
        return [row["id"] for row in interrupted]

    def prune(self, keep: int) -> int:
        """Bound disk use: delete the oldest finished jobs beyond the newest `keep`, and the oldest uploads beyond as
        many. Returns how many jobs went."""
        rows = self._query(f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(FINISHED))}) "
                           "ORDER BY seq DESC LIMIT -1 OFFSET ?", (*FINISHED, keep))
        for row in rows:
            self.delete(row["id"])
        uploads = sorted(self.uploads_dir.glob("upload_*"), key=lambda path: path.stat().st_mtime, reverse=True)
        for path in uploads[keep:]:
            path.unlink(missing_ok=True)
        return len(rows)

    def add_upload(self, data: bytes, content_type: str) -> tuple[str, Path]:
        """Store an uploaded start video or image under a new id, whole or not at all. Returns (id, path)."""
        upload_id = f"upload_{secrets.token_hex(12)}"
        path = self.uploads_dir / f"{upload_id}{UPLOAD_TYPES[content_type]}"
        with atomic_file(path) as temporary:
            Path(temporary).write_bytes(data)
        return upload_id, path
