"""How long writing a finished video takes in each output format, at the shipped model's, ms-1.7b's and ZeroScope's
sizes. The frames are a moving colour gradient with a little noise (deterministic), so every frame has thousands of
colours as a real video does. Median of --runs writes each, and how far each lossy format's frames are from the
video's (mean absolute difference, levels of 255: MP4 and WebM lose the chroma's resolution and some detail, GIF
holds 256 colours a frame) and their sizes; prints a Markdown table.

    python benchmarks/writing.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402

SIZES = [(16, 64, 64), (16, 256, 256), (24, 320, 576)]
FORMATS = ["clip.mp4", "clip.webm", "clip.gif", "clip.npy", "frames"]
LOSSY = ["clip.mp4", "clip.webm", "clip.gif"]


def moving_gradient(frames: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    video = np.stack([np.stack([(x + 4 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + 8 * t) % 256], axis=-1)
                      for t in range(frames)])
    noise = np.random.default_rng(0).integers(-6, 7, video.shape)
    return np.clip(video + noise, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from vidsynth.video import read_frames, write_video

    print(f"`{command_line()}` on {cpu_name()}, {os.cpu_count()} cores, {date.today()}\n")
    print("| frames x height x width | " + " | ".join(FORMATS) + " | difference: " + " / ".join(LOSSY) +
          " | kB: " + " / ".join(LOSSY) + " |")
    print("|---" * (len(FORMATS) + 3) + "|")
    for frames, height, width in SIZES:
        video = moving_gradient(frames, height, width)
        seconds = []
        for name in FORMATS:
            times = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as folder:
                    started = time.perf_counter()
                    write_video(Path(folder) / name, video, 8, {"prompt": "benchmark"})
                    times.append(time.perf_counter() - started)
            seconds.append(statistics.median(times))
        differences, sizes = [], []
        for name in LOSSY:
            with tempfile.TemporaryDirectory() as folder:
                path = write_video(Path(folder) / name, video, 8, {}, sidecar=False)
                differences.append(np.abs(read_frames(path)[0].astype(int) - video).mean())
                sizes.append(path.stat().st_size)
        print(f"| {frames} x {height} x {width} | " + " | ".join(f"{s:.3f} s" for s in seconds) +
              " | " + " / ".join(f"{d:.2f}" for d in differences) +
              " | " + " / ".join(f"{size / 1000:.0f}" for size in sizes) + " |", flush=True)


if __name__ == "__main__":
    main()
