"""VAE decoding (or, with --encode, encoding) on the CPU: direct or Winograd convolutions, fresh or reused memory,
frames per chunk.

Decodes one video's latents (or encodes one video's frames, as video-to-video does) with ms-1.7b's VAE configuration
(random weights) in each configuration, each in a fresh process (what the C library's heap keeps from one would
change the next one's figures). Reports the seconds, the peak resident memory above the VAE alone, and the largest
difference from the first configuration's output (in pixel levels of 255; encoding: in latent units). The pipeline
runs on the CPU as the row marked "(the pipeline's)" does.

    python benchmarks/decoding.py [--encode] [--frames 16] [--height 256] [--width 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402
from versus_diffusers import full_size_vae, memory_now_gib, peak_memory_gib, reset_peak_memory  # noqa: E402

CPU = torch.device("cpu")


def configurations(height: int, width: int) -> list[tuple[str, int, bool, bool]]:
    """(name, frames per chunk, Winograd, reused memory), the first the pipeline's way before this benchmark."""
    from vidsynth.pipeline import DECODE_FRAMES, frames_per_decode

    chunk = frames_per_decode(CPU, height, width)
    return [(f"direct, {DECODE_FRAMES} frames a chunk", DECODE_FRAMES, False, False),
            (f"direct, {chunk} a chunk", chunk, False, False),
            (f"direct, {DECODE_FRAMES} a chunk, reused memory", DECODE_FRAMES, False, True),
            (f"Winograd, {chunk} a chunk", chunk, True, False),
            (f"Winograd, {DECODE_FRAMES} a chunk, reused memory", DECODE_FRAMES, True, True),
            (f"Winograd, {chunk} a chunk, reused memory (the pipeline's)", chunk, True, True)]


def run_once(encode: bool, frames: int, height: int, width: int, dtype: torch.dtype, chunk: int, winograd: bool,
             reuse: bool, out: Path) -> dict:
    from vidsynth.convolution import rewritten_convolutions
    from vidsynth.cpu_memory import freed_memory_reused

    torch.manual_seed(0)
    vae = full_size_vae(dtype)
    if encode:
        inputs = torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    else:
        inputs = torch.randn(frames, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
    loaded = memory_now_gib(CPU)
    reset_peak_memory(CPU)
    started = time.perf_counter()
    with (torch.inference_mode(), rewritten_convolutions(vae) if winograd else contextlib.nullcontext(),
          freed_memory_reused() if reuse else contextlib.nullcontext()):
        if encode:
            outputs = [vae.encode(part.to(dtype)).latent_dist.mode().float() for part in inputs.split(chunk)]
        else:
            outputs = [vae.decode(part.to(dtype)).sample.float() for part in inputs.split(chunk)]
    seconds = time.perf_counter() - started
    peak = peak_memory_gib(CPU)
    output = torch.cat(outputs)
    np.save(out, output.numpy() if encode else ((output + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy())
    return dict(seconds=seconds, above_vae=peak - loaded)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encode", action="store_true", help="encode frames (video-to-video) instead of decoding")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--configuration", type=int, help=argparse.SUPPRESS)  # the child process's one
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = configurations(args.height, args.width)
    if args.configuration is not None:
        _, chunk, winograd, reuse = rows[args.configuration]
        print(json.dumps(run_once(args.encode, args.frames, args.height, args.width, dtype, chunk, winograd, reuse,
                                  Path(args.out))))
        return

    print(f"Command: `{command_line()}`  ")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; date {date.today()}. "
          f"ms-1.7b's VAE, random weights, {'encoding' if args.encode else 'decoding'}, {args.dtype}, "
          f"{args.frames} frames {args.width}x{args.height}; each row in a fresh process.\n")
    print("| configuration | seconds | peak above the VAE (GiB) | max difference from the first row |\n"
          "|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        first = None
        for index, (name, *_) in enumerate(rows):
            out = Path(folder) / f"{index}.npy"
            child = subprocess.run(
                [sys.executable, __file__, "--configuration", str(index), "--out", str(out), "--frames",
                 str(args.frames), "--height", str(args.height), "--width", str(args.width), "--dtype", args.dtype,
                 *(["--encode"] if args.encode else [])],
                check=True, stdout=subprocess.PIPE, text=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            output = np.load(out).astype(np.float64)
            first = output if first is None else first
            print(f"| {name} | {row['seconds']:.1f} | {row['above_vae']:.2f} | {np.abs(output - first).max():.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
