"""Peak memory of long and large videos with the full-size configuration, and what chunking saves.

One denoising step per configuration (peak memory does not grow with steps), chunked VAE decode (as the pipeline
chunks it), with and without forward chunking. Each configuration runs in a fresh process, as a server or a
CLI run would: what one leaves in the C library's heap would otherwise change the next one's figure. Reported per
configuration: memory with the weights loaded, the peak while generating and what stays after it (CPU: resident set
size and its peak; CUDA: torch.cuda.memory_allocated and max_memory_allocated).

    python benchmarks/memory.py [--device auto] [--dtype auto] [--chunking both] [--cases 0,1]

`--chunking auto` leaves the choice to the pipeline (the low-memory mode when a video would not fit in the memory
available) and reports what it chose; run it under a memory limit (a cgroup) to see it choose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402
from versus_diffusers import full_size_components, memory_now_gib, peak_memory_gib, reset_peak_memory  # noqa: E402

CASES = [("64 frames 256x256", dict(frames=64, height=256, width=256)),
         ("24 frames 576x320 (ZeroScope size)", dict(frames=24, height=320, width=576))]


CHUNKING = {"off": False, "on": True, "auto": None}


def run_case(case: int, chunking: str, device_choice: str, dtype_choice: str) -> dict:
    """One configuration in this process; memory figures in GiB."""
    from vidsynth.devices import resolve_device, resolve_dtype
    from vidsynth.pipeline import Pipeline

    device = resolve_device(device_choice)
    dtype = resolve_dtype(dtype_choice, device)
    pipeline = Pipeline(full_size_components(dtype), device, dtype, forward_chunking=CHUNKING[chunking])
    size = CASES[case][1]
    loaded = memory_now_gib(device)
    reset_peak_memory(device)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        video = pipeline("A car flying in space.", steps=1, seed=0, progress=False, **size)
    seconds = time.perf_counter() - started
    if chunking == "auto":
        chose = any("low-memory mode" in str(warning.message) for warning in caught)
        chunking = f"auto: {'on' if chose else 'off'}"
    assert video.frames.shape == (size["frames"], size["height"], size["width"], 3)
    return dict(chunking=chunking, loaded=loaded, peak=peak_memory_gib(device), after=memory_now_gib(device),
                seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunking", choices=("off", "on", "both", "auto"), default="both",
                        help="forward chunking (feed-forward layers one frame at a time)")
    parser.add_argument("--cases", default=",".join(str(case) for case in range(len(CASES))),
                        help="which videos, by index: " + ", ".join(f"{i} {name}" for i, (name, _) in enumerate(CASES)))
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # the child process's one configuration
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.chunking, args.device, args.dtype)))
        return

    from vidsynth.devices import dtype_name, resolve_device, resolve_dtype
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"Command: `{command_line()}`  ")
    print(f"Machine: {torch.cuda.get_device_name() if device.type == 'cuda' else f'{cpu_name()}, {os.cpu_count()} cores'}, "
          f"torch {torch.__version__}; date {date.today()}. ms-1.7b configuration, random weights, "
          f"{dtype_name(dtype)}, 1 DDIM step, guidance 9; each row in a fresh process.\n")
    print("| video | forward chunking | weights loaded (GiB) | peak (GiB) | after the video (GiB) "
          "| seconds (1 step, decode) |\n|---|---|---|---|---|---|", flush=True)
    for chunking in ("off", "on") if args.chunking == "both" else (args.chunking,):
        for case in map(int, args.cases.split(",")):
            name = CASES[case][0]
            child = subprocess.run(
                [sys.executable, __file__, "--case", str(case), "--chunking", chunking, "--device", args.device,
                 "--dtype", args.dtype], check=True, stdout=subprocess.PIPE, text=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"| {name} | {row['chunking']} | {row['loaded']:.2f} | {row['peak']:.2f} | {row['after']:.2f} | "
                  f"{row['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
