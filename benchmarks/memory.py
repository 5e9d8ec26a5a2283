"""Peak memory of long and large videos with the full-size configuration, and what chunking saves.

One denoising step per configuration (peak memory does not grow with steps), chunked VAE decode (8 frames at a
time, always on), with and without forward chunking. CPU: peak RSS; CUDA: torch.cuda.max_memory_allocated.

    python benchmarks/memory.py [--device auto] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import cpu_name  # noqa: E402
from versus_diffusers import full_size_components, peak_memory_gib, reset_peak_memory  # noqa: E402

CASES = [("64 frames 256x256", dict(frames=64, height=256, width=256)),
         ("24 frames 576x320 (ZeroScope size)", dict(frames=24, height=320, width=576))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    from vidsynth.devices import dtype_name, resolve_device, resolve_dtype
    from vidsynth.pipeline import Pipeline

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = full_size_components(dtype)
    reset_peak_memory(device)
    weights = peak_memory_gib(device)
    rows = []
    for chunking in (False, True):
        pipeline = Pipeline(components, device, dtype, forward_chunking=chunking)
        for name, size in CASES:
            reset_peak_memory(device)
            started = time.perf_counter()
            video = pipeline("A car flying in space.", steps=1, seed=0, progress=False, **size)
            rows.append((name, chunking, peak_memory_gib(device), time.perf_counter() - started, video.frames.shape))
    print(f"Command: `python benchmarks/memory.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {torch.cuda.get_device_name() if device.type == 'cuda' else f'{cpu_name()}, {os.cpu_count()} cores'}, "
          f"torch {torch.__version__}; date {date.today()}. ms-1.7b configuration, random weights, "
          f"{dtype_name(dtype)}, 1 DDIM step, guidance 9; weights and process alone: {weights:.2f} GiB.\n")
    print("| video | forward chunking | peak memory (GiB) | seconds (1 step + decode + nothing written) |\n|---|---|---|---|")
    for name, chunking, peak, seconds, shape in rows:
        print(f"| {name} | {'on' if chunking else 'off'} | {peak:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
