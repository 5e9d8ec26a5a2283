"""How the CPU pipeline's speed depends on PyTorch's thread count: the denoising and decoding of one video with 1,
the machine's cores (PyTorch's default, which vidsynth keeps) and twice as many threads, each in a fresh process.

Runs the full-size ms-1.7b configuration with random weights, or any --model, one warm-up video then --runs timed
ones per thread count; prints seconds per denoising step and for decoding (medians) as a Markdown table.

    python benchmarks/threads.py --frames 8 --height 128 --width 128 --steps 1
    python benchmarks/threads.py --model vidsynth-tiny --frames 16 --height 64 --width 64 --steps 6 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402
from versus_diffusers import add_video_arguments, components_for  # noqa: E402


def timed_videos(args: argparse.Namespace) -> dict:
    """In this process, with `args.threads` threads: the median seconds per denoising step and for decoding."""
    from vidsynth.pipeline import Pipeline
    from vidsynth.request import GenerationRequest

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    pipeline = Pipeline(components_for(args, torch.float32, cpu), cpu, torch.float32)
    request = GenerationRequest(prompt="a red circle moving left", frames=args.frames, height=args.height,
                                width=args.width, steps=args.steps, guidance=args.guidance, seed=0)
    marks = {}
    step_times, decode_times = [], []

    def clock(event):
        marks[(event.phase, event.step)] = time.perf_counter()

    for run in range(args.runs + 1):  # the first is the warm-up
        marks.clear()
        pipeline.generate(request, clock)
        denoise = marks[("denoise", args.steps)] - marks[("encode", 1)]
        decode = marks[("done", 1)] - marks[("denoise", args.steps)]
        if run:
            step_times.append(denoise / args.steps)
            decode_times.append(decode)
    return {"step": statistics.median(step_times), "decode": statistics.median(decode_times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_video_arguments(parser)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="timed videos per thread count")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # the child process's count
    args = parser.parse_args()
    if args.threads is not None:
        print(json.dumps(timed_videos(args)))
        return

    default = torch.get_num_threads()
    counts = sorted({1, default, 2 * default})
    print(f"Command: `{command_line()}`  ")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} (default "
          f"{default} threads); date {date.today()}. {args.model or 'ms-1.7b configuration, random weights'}, "
          f"float32, {args.frames} frames {args.width}x{args.height}, guidance {args.guidance}; medians of "
          f"{args.runs} videos after a warm-up, each thread count in a fresh process.\n")
    print("| threads | seconds per denoising step | decoding (s) |\n|---|---|---|", flush=True)
    for count in counts:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--threads", str(count)], check=True,
                               stdout=subprocess.PIPE, text=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        label = f"{count} (the default)" if count == default else str(count)
        print(f"| {label} | {row['step']:.3f} | {row['decode']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
