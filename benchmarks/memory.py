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
from machine import cpu_name  # noqa: E402
from versus_diffusers import full_size_components, peak_memory_gib, reset_peak_memory  # noqa: E402

CASES = [("64 frames 256x256", dict(frames=64, height=256, width=256)),
         ("24 frames 576x320 (ZeroScope size)", dict(frames=24, height=320, width=576))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunking", choices=("off", "on", "both"), default="both",
                        help="forward chunking (feed-forward layers one frame at a time)")
    args = parser.parse_args()
    from vidsynth.devices import dtype_name, resolve_device, resolve_dtype
    from vidsynth.pipeline import Pipeline

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = full_size_components(dtype)
    reset_peak_memory(device)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device)  # where each pipeline below keeps them, so that this figure is the weights alone
    weights = peak_memory_gib(device)
    print(f"Command: `python benchmarks/memory.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {torch.cuda.get_device_name() if device.type == 'cuda' else f'{cpu_name()}, {os.cpu_count()} cores'}, "
          f"torch {torch.__version__}; date {date.today()}. ms-1.7b configuration, random weights, "
          f"{dtype_name(dtype)}, 1 DDIM step, guidance 9; weights and process alone: {weights:.2f} GiB.\n")
    print("| video | forward chunking | peak memory (GiB) | seconds (1 step, decode) |\n|---|---|---|---|", flush=True)
    for chunking in {"off": (False,), "on": (True,), "both": (False, True)}[args.chunking]:
        pipeline = Pipeline(components, device, dtype, forward_chunking=chunking)
        for name, size in CASES:
            reset_peak_memory(device)
            started = time.perf_counter()
            video = pipeline("A car flying in space.", steps=1, seed=0, progress=False, **size)
            assert video.frames.shape == (size["frames"], size["height"], size["width"], 3)
            print(f"| {name} | {'on' if chunking else 'off'} | {peak_memory_gib(device):.2f} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
