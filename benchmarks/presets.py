"""What the presets and each fast path alone buy, and what they cost, against the model's own sampling.

For each configuration: median generation time (in process, model loaded), speed-up over the default, and the
same-seed PSNR and SSIM of its frames against the default's; optionally the `vidsynth eval` scores. Prints Markdown.

    python benchmarks/presets.py [--model M] [--runs 3] [--eval-prompts 20 --eval-seeds 2]
    python benchmarks/presets.py --full-size --frames 8 --height 128 --width 128 --runs 1 --prompts 1

`--full-size` times ms-1.7b's configuration with random weights (its 50-step default is what `fast` is measured
against); its pictures mean nothing, so PSNR/SSIM there only say how far each path strays from the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402

PROMPTS = ["a red circle moving left on a black background", "a blue square growing on a white background",
           "a yellow triangle moving down and to the right on a gray background"]
CONFIGURATIONS = [
    ("default (quality)", {}),
    ("dpm++ at 40 % of the steps", {"scheduler": "dpm++", "steps_fraction": 0.4}),
    ("deep-feature reuse, interval 3", {"cache_interval": 3}),
    ("guidance on the first half", {"guidance_fraction": 0.5}),
    ("every step guided", {"guidance_fraction": 1.0}),
    ("preset balanced", {"preset": "balanced"}),
    ("preset fast", {"preset": "fast"}),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM over frames of the luma, with a square window (Wang et al. 2004 constants)."""
    def luma(video):
        return video.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    def local_mean(x):
        return sliding_window_view(x, (window, window), axis=(1, 2)).mean(axis=(-1, -2))

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - mx ** 2, local_mean(y * y) - my ** 2, local_mean(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--eval-prompts", type=int, default=0, help="also score the presets with vidsynth eval")
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--full-size", action="store_true", help="ms-1.7b's configuration with random weights")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    args = parser.parse_args()

    import vidsynth
    from vidsynth.evaluate import default_specs, evaluate

    if args.full_size:
        from vidsynth.devices import resolve_device, resolve_dtype
        from vidsynth.pipeline import Pipeline
        from versus_diffusers import full_size_components
        device = resolve_device("auto")
        dtype = resolve_dtype("auto", device)
        pipeline = Pipeline(full_size_components(dtype), device, dtype)
    else:
        pipeline = vidsynth.load(args.model)
    size = {k: v for k, v in (("frames", args.frames), ("height", args.height), ("width", args.width)) if v}
    default_steps = pipeline.defaults.steps
    rows, reference = [], {}
    for name, fields in CONFIGURATIONS:
        fields = {**size, **fields}
        if "steps_fraction" in fields:
            fields["steps"] = max(1, round(default_steps * fields.pop("steps_fraction")))
        pipeline(PROMPTS[0], seed=0, progress=False, **{**fields, "steps": 1})  # warm-up: first-call costs only
        seconds, scores = [], []
        for run in range(args.runs):
            for index, prompt in enumerate(PROMPTS[:args.prompts]):
                started = time.perf_counter()
                frames = pipeline(prompt, seed=index, progress=False, **fields).frames
                seconds.append(time.perf_counter() - started)
                if name == CONFIGURATIONS[0][0]:
                    reference[index] = frames
                scores.append((psnr(frames, reference[index]), ssim(frames, reference[index])))
        rows.append((name, statistics.median(seconds), scores, fields))
    base = rows[0][1]

    print(f"Command: `{command_line()}`  ")
    frames, width, height = (size.get(k, getattr(pipeline.defaults, k)) for k in ("frames", "width", "height"))
    share = pipeline.defaults.guidance_fraction
    guided = f" guided on the first {share:.0%}" if share < 1 else ""
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores; date {date.today()}. Model: {pipeline.name}, "
          f"{frames} frames {width}x{height}, default {default_steps} DDIM steps{guided}; {args.prompts} prompts x "
          f"{args.runs} runs.\n")
    print("| configuration | seconds per video (median) | speed-up | PSNR vs default (dB) | SSIM vs default |")
    print("|---|---|---|---|---|")
    for name, seconds, scores, _ in rows:
        finite = [p for p, _ in scores if np.isfinite(p)]
        shown = f"{np.mean(finite):.1f}" if finite else "identical"
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x | {shown} | {np.mean([s for _, s in scores]):.3f} |")

    if args.eval_prompts:
        print(f"\n`vidsynth eval` scores, {args.eval_prompts} held-out captions x {args.eval_seeds} seeds:\n")
        print("| configuration | colour | shape | direction | flicker |\n|---|---|---|---|---|")
        for name, fields in (("default (quality)", {}), ("preset balanced", {"preset": "balanced"}),
                             ("preset fast", {"preset": "fast"})):
            summary = evaluate(pipeline, default_specs(args.eval_prompts), args.eval_seeds, **size, **fields)
            print(f"| {name} | {summary['color_accuracy']:.1%} | {summary['shape_accuracy']:.1%} | "
                  f"{summary['direction_accuracy']:.1%} | {summary['mean_flicker']:.2f} |")


if __name__ == "__main__":
    main()
