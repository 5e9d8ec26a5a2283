"""The result of a generation and the files it is written to.

The format follows the extension: .mp4 (H.264, yuv420p, +faststart: plays in browsers), .webm (VP9), .gif, .npy
(the exact uint8 frames, F x H x W x 3) or, with no extension, a folder of numbered PNGs. Every file is written
to a temporary name beside the target and renamed into place (`files.py`), so a failure never leaves half a file.
The generation settings go into the file itself (mp4 and webm metadata, the GIF's comment) and into a JSON sidecar
(`<name>.json`, or `settings.json` inside a PNG folder).
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import av
import numpy as np
from PIL import Image

from .errors import InputError, OutputError, RequestError
from .files import PathLike, atomic_file, atomic_folder, check_file_path, check_writable_folder
from .request import MAX_FRAMES

VIDEO_FORMATS = {".mp4": "libx264", ".webm": "libvpx-vp9"}
FILE_FORMATS = (*VIDEO_FORMATS, ".gif", ".npy")
METADATA_KEY = "comment"


@dataclass
class Video:
    frames: np.ndarray  # uint8, frames x height x width x 3
    fps: int = 8
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self):
        return self.settings.get("seed")

    def save(self, path: PathLike) -> Path:
        return write_video(path, self.frames, self.fps, self.settings)

    def to_bytes(self, suffix: str = ".mp4") -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            return write_video(Path(folder) / f"video{suffix}", self.frames, self.fps, self.settings, sidecar=False).read_bytes()

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.to_bytes(".mp4")).decode("ascii")
        height, width = self.frames.shape[1:3]
        scale = max(1, 256 // max(height, width))  # small models make small videos; show them at a visible size
        caption = self.settings.get("prompt", "")
        return (f'<figure style="margin:0"><video controls autoplay loop muted playsinline width="{width * scale}" '
                f'height="{height * scale}" src="data:video/mp4;base64,{data}"></video>'
                f'<figcaption>{_html_escape(caption)} (seed {self.seed})</figcaption></figure>')

    def __repr__(self) -> str:
        frames, height, width = self.frames.shape[:3]
        return f"Video({frames} frames, {width}x{height}, {self.fps} fps, seed={self.seed}, prompt={self.settings.get('prompt')!r})"


class Videos(list):
    """The videos of one request, in order; a notebook shows them side by side."""

    def save(self, path: PathLike) -> list[Path]:
        """Every video: to `path` if there is one, else to NAME-1.EXT, NAME-2.EXT... Every path is checked before
        any video is written."""
        paths = numbered_paths(path, len(self))
        for target in paths:
            check_output_path(target)
        return [video.save(target) for video, target in zip(self, paths)]

    def _repr_html_(self) -> str:
        return ('<div style="display:flex;flex-wrap:wrap;gap:12px">' + "".join(video._repr_html_() for video in self)
                + "</div>")


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def numbered_paths(path: PathLike, count: int) -> list[Path]:
    """Where `count` videos asked to go to `path` are written: `path` for one; NAME-1.EXT, NAME-2.EXT... for more."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index + 1}{path.suffix}") for index in range(count)]


def output_kind(path: PathLike) -> str:
    """The output format a path asks for, or OutputError when the extension is unknown."""
    suffix = Path(path).suffix.lower()
    if suffix == "":
        return "png"
    if suffix not in FILE_FORMATS:
        raise OutputError(f"unknown output extension {suffix!r}; use one of {', '.join(FILE_FORMATS)}, "
                          f"or a name without extension for a folder of PNG frames")
    return suffix.lstrip(".")


def check_output_path(path: PathLike) -> Path:
    """Fail before any work is done if `path` cannot be written."""
    path = Path(path).expanduser()
    if output_kind(path) != "png":
        return check_file_path(path)
    check_writable_folder(path.parent)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{path} already exists and is not an empty folder")
    return path


def sidecar_path(path: Path) -> Path:
    return path / "settings.json" if output_kind(path) == "png" else path.with_suffix(".json")


def write_video(path: PathLike, frames: np.ndarray, fps: int, settings: dict, *, sidecar: bool = True) -> Path:
    path = check_output_path(path)
    kind = output_kind(path)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 frames x height x width x 3, got shape {frames.shape}")
    if kind == "png":
        with atomic_folder(path) as folder:
            for index, frame in enumerate(frames):
                Image.fromarray(frame).save(folder / f"{index:04d}.png")
            if sidecar:
                (folder / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        return path
    # The video and its sidecar are renamed into place once both are written: neither is left without the other.
    with contextlib.ExitStack() as files:
        temporary = files.enter_context(atomic_file(path))
        if kind in ("mp4", "webm"):
            _encode(temporary, frames, fps, VIDEO_FORMATS[path.suffix.lower()], settings, kind)
        elif kind == "gif":
            images = [_palette_image(frame) for frame in frames]
            # The settings go into the GIF's comment extension, so a GIF passed on still says how it was made.
            comment = json.dumps(settings, separators=(",", ":")).encode() if settings else b""
            images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:],
                           duration=round(1000 / fps), loop=0, comment=comment)
        else:
            # Through a buffer: numpy writes a real file with C's fwrite, whose failure gives no reason ("N requested
            # and M written"), where Python's write says "No space left on device". Its bytes copied out, not lent as a
            # view: a failed write's traceback would hold the view, and Python 3.12.1 crashed collecting the buffer.
            buffer = io.BytesIO()
            np.save(buffer, frames)
            Path(temporary).write_bytes(buffer.getvalue())
        if sidecar:
            sidecar_temporary = files.enter_context(atomic_file(sidecar_path(path)))
            Path(sidecar_temporary).write_text(json.dumps(settings, indent=2) + "\n")
    return path


def _encode(path: str, frames: np.ndarray, fps: int, codec: str, settings: dict, kind: str) -> None:
    # H.264 yuv420p needs even sides; the models make multiples of 8, but frames given by hand may not be.
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    options = {"movflags": "+faststart"} if kind == "mp4" else {}
    with av.open(path, mode="w", format=kind, options=options) as container:
        container.metadata[METADATA_KEY] = json.dumps(settings, separators=(",", ":"))
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # At 256x256 and larger x264's "veryfast" preset wrote 1.6-2.1x faster than "fast" (itself 1.2-1.4x faster
        # than the default), 0.05 levels further from the frames; VP9's cpu-used 2 1.3-1.8x faster than its default,
        # as close (BENCHMARKS.md, "Writing the video file").
        x264, vp9 = {"crf": "18", "preset": "veryfast"}, {"crf": "24", "b": "0", "cpu-used": "2"}
        stream.options = x264 if codec == "libx264" else vp9
        for frame in frames:
            # Converted here rather than by the encoder: that conversion varied from run to run.
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _palette_image(frame: np.ndarray) -> Image.Image:
    """The frame in GIF's 256-colour palette mode: exact when it has at most 256 colours, otherwise quantised by fast
    octree. PIL's default, median cut, took 4.1 s for 16 frames of 256x256 where this takes 0.1 s, for 1.5x the
    colour error on frames of thousands of colours (BENCHMARKS.md, "Writing the video file")."""
    packed = (frame[..., 0].astype(np.uint32) << 16) | (frame[..., 1].astype(np.uint32) << 8) | frame[..., 2]
    colours, indices = np.unique(packed, return_inverse=True)
    if len(colours) > 256:
        return Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE)
    image = Image.frombytes("P", (frame.shape[1], frame.shape[0]), indices.astype(np.uint8).tobytes())
    image.putpalette(np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8).tobytes())
    return image


def read_settings(path: PathLike) -> dict:
    """The generation settings stored with a video: its container metadata, else its JSON sidecar."""
    path = Path(path).expanduser()
    if not path.exists():
        raise OutputError(f"{path} does not exist")
    if path.suffix.lower() == ".json":
        return _read_json(path)
    stored = _embedded_settings(path)
    if stored:
        try:
            return json.loads(stored)
        except json.JSONDecodeError:
            pass
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return _read_json(sidecar)
    raise OutputError(f"{path} carries no vidsynth settings (no metadata and no {sidecar.name})")


def _embedded_settings(path: Path) -> Optional[str]:
    """The settings a file carries in itself: the container's metadata (mp4, webm) or the GIF's comment."""
    suffix = path.suffix.lower()
    try:
        if suffix in VIDEO_FORMATS:
            with av.open(str(path)) as container:
                return container.metadata.get(METADATA_KEY)
        if suffix == ".gif":
            with Image.open(path) as image:
                comment = image.info.get("comment")
            return comment.decode("latin-1") if comment else None  # JSON as written here is ASCII
    except (av.FFmpegError, OSError) as exc:  # PIL's "cannot identify image file" is an OSError
        raise OutputError(f"{path} is not a readable video: {exc}") from None
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutputError(f"{path} is not valid JSON: {exc}") from None


def read_start_video(path: str, limit: int = MAX_FRAMES + 1) -> tuple[np.ndarray, Optional[float]]:
    """The frames and frame rate of a video to start from, by default up to one more frame than a request may make
    (enough to tell a video that is too long); RequestError naming init_video if it cannot be read."""
    try:
        return read_frames(path, limit=limit)
    except InputError as exc:
        raise RequestError("init_video", str(exc)) from None


def read_frames(path: PathLike, limit: Optional[int] = None) -> tuple[np.ndarray, Optional[float]]:
    """A video as uint8 frames (F x H x W x 3), its first `limit` only if given, and its frame rate: any file PyAV
    decodes, or what vidsynth writes without a rate (.npy, a folder of PNG frames: rate None). InputError when it
    cannot be read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        if path.is_dir():
            pngs = sorted(path.glob("*.png"))[:limit]
            frames, rate = [np.asarray(Image.open(png).convert("RGB")) for png in pngs], None
        elif path.suffix.lower() == ".npy":
            frames, rate = np.load(path, mmap_mode="r", allow_pickle=False)[:limit], None
        else:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"{path} has no video stream")
                stream = container.streams.video[0]
                decoded = itertools.islice(container.decode(stream), limit)
                frames = [frame.to_ndarray(format="rgb24") for frame in decoded]
                rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        if len(frames) == 0:
            raise InputError(f"{path} holds no frames" + (" (no .png files)" if path.is_dir() else ""))
        frames = np.stack(frames) if isinstance(frames, list) else np.array(frames)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable video: {exc}") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"{path} must hold uint8 frames x height x width x 3, not {frames.dtype} {frames.shape}")
    return frames, rate
