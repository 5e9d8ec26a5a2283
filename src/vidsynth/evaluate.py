"""`vidsynth eval`: does a model draw what the prompt says? Measured with a plain vision check, no learned model.

Each video is segmented against its background (the median colour of the frame borders); the foreground's colour
is matched to the named colours, its fill ratio (area / bounding box) tells circle (~0.79) from square (~1.0) and
triangle (~0.5), and its centroid track and area tell the motion. Temporal flicker is the mean absolute difference
between consecutive frames.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .data import BACKGROUNDS, COLORS, DIRECTIONS, ClipSpec, evaluation_specs
from .files import atomic_file
from .request import GenerationRequest, MAX_PROMPTS

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as shape
FILL_RATIO = {"square": 0.95, "circle": 0.78, "triangle": 0.5}


@dataclass
class Analysis:
    color: Optional[str]
    shape: Optional[str]
    motion: Optional[str]
    background: str
    flicker: float


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name], float) - rgb) ** 2)))


def analyse(frames: np.ndarray) -> Analysis:
    """What a video shows, as the words of the dataset's captions."""
    video = frames.astype(np.float32)
    count, height, width = video.shape[:3]
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]]).reshape(-1, 3)
    background_rgb = np.median(border, axis=0)
    flicker = float(np.abs(np.diff(video, axis=0)).mean()) if count > 1 else 0.0
    background = _nearest(background_rgb, BACKGROUNDS)
    masks = np.linalg.norm(video - background_rgb, axis=-1) > FOREGROUND_DISTANCE
    areas = masks.sum(axis=(1, 2))
    visible = areas >= max(4, 0.002 * height * width)
    if visible.sum() < max(2, count // 2):
        return Analysis(None, None, None, background, flicker)

    color = _nearest(np.median(video[masks], axis=0), COLORS)
    ys, xs = np.mgrid[0:height, 0:width]
    centroids, fills = [], []
    for mask, area in zip(masks[visible], areas[visible]):
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append(area / box)
        centroids.append(((xs * mask).sum() / area, (ys * mask).sum() / area))
    fill = float(np.median(fills))
    shape = min(FILL_RATIO, key=lambda name: abs(FILL_RATIO[name] - fill))
    return Analysis(color, shape, _motion(np.array(centroids), areas[visible].astype(float), width), background, flicker)


def _motion(centroids: np.ndarray, areas: np.ndarray, size: int) -> str:
    third = max(1, len(centroids) // 3)
    displacement = centroids[-third:].mean(axis=0) - centroids[:third].mean(axis=0)
    growth = areas[-third:].mean() / max(areas[:third].mean(), 1.0)
    if np.hypot(*displacement) > 0.12 * size:
        angle = math.atan2(displacement[1], displacement[0])
        return min(DIRECTIONS, key=lambda name: _angle_between(angle, math.atan2(DIRECTIONS[name][1], DIRECTIONS[name][0])))
    if growth > 1.6:
        return "growing"
    if growth < 1 / 1.6:
        return "shrinking"
    return "still"


def _angle_between(a: float, b: float) -> float:
    return abs((a - b + math.pi) % (2 * math.pi) - math.pi)


@dataclass
class Sample:
    caption: str
    seed: int
    expected: dict
    found: dict


def evaluate(pipeline, specs: list[ClipSpec], seeds: int, *, base_seed: int = 0, callback=None, **settings) -> dict:
    """Generate every spec's caption with `seeds` seeds and score what is seen against what was asked. The summary's
    `sampling` is how the videos were made (the first video's settings but its prompt and seed)."""
    samples = []
    started = time.monotonic()
    for start in range(0, len(specs), MAX_PROMPTS):
        batch = specs[start:start + MAX_PROMPTS]
        request = GenerationRequest.create(prompt=[s.caption for s in batch], num_videos=seeds, seed=base_seed, **settings)
        videos = pipeline.generate(request, callback)
        for index, video in enumerate(videos):
            spec = batch[index // seeds]
            found = asdict(analyse(video.frames))
            samples.append(Sample(spec.caption, video.seed, asdict(spec), found))
        if start == 0:
            sampling = {key: value for key, value in videos[0].settings.items() if key not in ("prompt", "seed")}
    return {**summarise(samples, time.monotonic() - started), "sampling": sampling}


def summarise(samples: list[Sample], seconds: float) -> dict:
    def accuracy(key):
        return sum(s.found[key] == s.expected[key] for s in samples) / len(samples)

    directional = [s for s in samples if s.expected["motion"] in DIRECTIONS]
    return {
        "samples": len(samples),
        "color_accuracy": accuracy("color"),
        "shape_accuracy": accuracy("shape"),
        "motion_accuracy": accuracy("motion"),
        "direction_accuracy": (sum(s.found["motion"] == s.expected["motion"] for s in directional) / len(directional)
                               if directional else None),
        "background_accuracy": accuracy("background"),
        "mean_flicker": float(np.mean([s.found["flicker"] for s in samples])),
        "errors": {key: _confusions(samples, key) for key in ("color", "shape", "motion", "background")},
        "seconds": seconds,
        "results": [asdict(s) for s in samples],
    }


def _confusions(samples: list[Sample], key: str) -> dict[str, int]:
    """What was drawn instead of what was asked, most frequent first: {"square -> circle": 2, ...}."""
    wrong = Counter(f"{s.expected[key]} -> {s.found[key] or 'nothing'}" for s in samples
                    if s.found[key] != s.expected[key])
    return dict(wrong.most_common())


def format_table(summary: dict) -> str:
    rows = [("colour", summary["color_accuracy"]), ("shape", summary["shape_accuracy"]),
            ("motion (all kinds)", summary["motion_accuracy"]), ("direction of motion", summary["direction_accuracy"]),
            ("background", summary["background_accuracy"])]
    lines = [f"{summary['samples']} videos in {summary['seconds']:.0f} s", "", "| measure | accuracy |", "|---|---|"]
    lines += [f"| {name} | {value * 100:.1f} % |" for name, value in rows if value is not None]
    lines.append(f"| temporal flicker (mean abs frame difference, 0-255) | {summary['mean_flicker']:.2f} |")
    errors = [f"{key}: " + ", ".join(f"{pair} ({count})" for pair, count in confusions.items())
              for key, confusions in summary["errors"].items() if confusions]
    lines += ["", "Errors (asked -> drawn): " + "; ".join(errors) if errors else "No errors."]
    return "\n".join(lines)


def default_specs(count: int) -> list[ClipSpec]:
    """`count` held-out captions, spread evenly over the held-out set."""
    specs = evaluation_specs()
    if count >= len(specs):
        return specs
    indices = np.linspace(0, len(specs) - 1, count).round().astype(int)
    return [specs[i] for i in indices]


def write_json(summary: dict, path: Path) -> None:
    with atomic_file(Path(path).expanduser()) as temporary:
        Path(temporary).write_text(json.dumps(summary, indent=2) + "\n")
