"""Training data: a procedural dataset of captioned shape clips, and folders of (video, caption) pairs.

A procedural clip shows one shape in a named colour on a plain background, moving in one of eight directions,
growing, shrinking or standing still, captioned in plain English: "a red circle moving left on a black background".
Everything is drawn with numpy from a seed, so a dataset is a seed, not files.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import InputError

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (250, 140, 30), "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (12, 12, 12), "gray": (128, 128, 128), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
# direction name -> unit step in image coordinates (x right, y down)
DIRECTIONS = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up and to the left": (-1, -1), "up and to the right": (1, -1),
    "down and to the left": (-1, 1), "down and to the right": (1, 1),
}
MOTIONS = (*DIRECTIONS, "growing", "shrinking", "still")


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    motion: str
    background: str

    @property
    def caption(self) -> str:
        if self.motion in DIRECTIONS:
            action = f"moving {self.motion}"
        elif self.motion == "still":
            action = "standing still"
        else:
            action = self.motion
        return f"a {self.color} {self.shape} {action} on a {self.background} background"


def all_specs() -> list[ClipSpec]:
    """Every combination the dataset can draw; a shape never has its background's colour."""
    return [ClipSpec(c, s, m, b) for c, s, m, b in itertools.product(COLORS, SHAPES, MOTIONS, BACKGROUNDS) if c != b]


def held_out(spec: ClipSpec, fraction: float = 0.12) -> bool:
    """A fixed subset of combinations never shown in training, to evaluate on captions the model never saw."""
    digest = hashlib.sha256(spec.caption.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def training_specs() -> list[ClipSpec]:
    return [spec for spec in all_specs() if not held_out(spec)]


def evaluation_specs() -> list[ClipSpec]:
    return [spec for spec in all_specs() if held_out(spec)]


def caption_words(text: str) -> list[str]:
    """The words of a caption or prompt, as a model's vocabulary counts them: lower case, letters and digits."""
    return re.findall(r"[^\W_]+", text.lower())


def vocabulary(captions) -> frozenset[str]:
    """Every word of `captions`: what a model trained on them can have learnt to draw."""
    return frozenset(word for caption in captions for word in caption_words(caption))


def _shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of each pixel, with a one-pixel soft edge so motion is smooth."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        inside = radius - np.hypot(x - cx, y - cy)
    elif shape == "square":
        inside = radius * 0.9 - np.maximum(np.abs(x - cx), np.abs(y - cy))
    else:  # an upward triangle: apex at the top, base at the bottom of its box
        top, bottom = cy - radius, cy + radius * 0.8
        half_width = (y - top) / (bottom - top) * radius * 1.1
        inside = np.minimum(np.minimum(y - top, bottom - y), half_width - np.abs(x - cx))
    return np.clip(inside + 0.5, 0.0, 1.0)


def render(spec: ClipSpec, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One clip as uint8 frames x size x size x 3."""
    # Radii that keep a shape several latent pixels wide: narrower outlines are lost in the autoencoder's latents.
    scale = size / 64
    if spec.motion == "growing":
        radii = np.linspace(6, 15, frames) * scale
    elif spec.motion == "shrinking":
        radii = np.linspace(15, 6, frames) * scale
    else:
        radii = np.full(frames, rng.uniform(9, 12) * scale)
    margin = radii.max() + 1
    if spec.motion in DIRECTIONS:
        dx, dy = DIRECTIONS[spec.motion]
        travel = rng.uniform(0.35, 0.5) * size / (np.hypot(dx, dy))
        start_x = _start(rng, dx, travel, margin, size)
        start_y = _start(rng, dy, travel, margin, size)
        steps = np.linspace(0, travel, frames)
        xs, ys = start_x + dx * steps, start_y + dy * steps
    else:
        xs = np.full(frames, rng.uniform(margin + 4 * scale, size - margin - 4 * scale))
        ys = np.full(frames, rng.uniform(margin + 4 * scale, size - margin - 4 * scale))
    background = np.array(BACKGROUNDS[spec.background], np.float32)
    color = np.array(COLORS[spec.color], np.float32)
    video = np.empty((frames, size, size, 3), np.uint8)
    for index in range(frames):
        coverage = _shape_mask(spec.shape, xs[index], ys[index], radii[index], size)[..., None]
        video[index] = np.round(background + coverage * (color - background)).astype(np.uint8)
    return video


def _start(rng: np.random.Generator, direction: int, travel: float, margin: float, size: int) -> float:
    if direction > 0:
        return rng.uniform(margin, max(margin, size - margin - travel))
    if direction < 0:
        return rng.uniform(min(size - margin, margin + travel), size - margin)
    return rng.uniform(margin + 2, size - margin - 2)


class ProceduralClips:
    """An endless, seeded stream of (frames, caption) from `specs`."""

    def __init__(self, frames: int, size: int, seed: int = 0, specs: Optional[list[ClipSpec]] = None):
        self.frames, self.size = frames, size
        self.specs = specs if specs is not None else training_specs()
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, str]:
        spec = self.specs[self.rng.integers(len(self.specs))]
        return render(spec, self.frames, self.size, self.rng), spec.caption

    @property
    def captions(self) -> list[str]:
        return [spec.caption for spec in self.specs]

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        while True:
            yield self.sample()


VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")


class VideoFolder:
    """(video, caption) pairs from a folder: each video file beside a .txt file of the same name holding its caption."""

    def __init__(self, folder: Path, frames: int, size: int, seed: int = 0):
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"dataset folder {folder} does not exist or is not a folder")
        videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise InputError(f"dataset folder {folder} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        uncaptioned = [p.name for p in videos if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise InputError(f"{len(uncaptioned)} videos have no caption file (<name>.txt beside them): "
                             f"{', '.join(uncaptioned[:5])}")
        self.frames, self.size = frames, size
        self.items = []
        for path in videos:
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            if not caption:
                raise InputError(f"caption file {path.with_suffix('.txt').name} is empty")
            self.items.append((self._load(path), caption))
        self.rng = np.random.default_rng(seed)

    def _load(self, path: Path) -> np.ndarray:
        from .video import read_frames
        try:
            video, _ = read_frames(path)
        except InputError as exc:
            raise InputError(f"cannot read video {path.name}: {exc}") from None
        if len(video) < self.frames:
            video = np.concatenate([video, np.repeat(video[-1:], self.frames - len(video), axis=0)])
        indices = np.linspace(0, len(video) - 1, self.frames).round().astype(int)
        return np.stack([_center_square(frame, self.size) for frame in video[indices]])

    def sample(self) -> tuple[np.ndarray, str]:
        return self.items[self.rng.integers(len(self.items))]

    @property
    def captions(self) -> list[str]:
        return [caption for _, caption in self.items]


def _center_square(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(frame[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))


class ClipStream(torch.utils.data.IterableDataset):
    """Endless (clip tensor, caption) pairs from a dataset with `rng` and `sample()`, for a DataLoader: each loader
    worker draws from its own copy with its own seed (worker 0, or no workers, uses `seed` itself)."""

    def __init__(self, data, seed: int):
        self.data, self.seed = data, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        worker = torch.utils.data.get_worker_info()
        data = copy.copy(self.data)
        data.rng = np.random.default_rng(self.seed + 1_000_003 * (worker.id if worker else 0))
        while True:
            clip, caption = data.sample()
            yield torch.from_numpy(clip), caption
