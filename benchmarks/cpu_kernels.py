"""How fast this CPU runs the UNet's own matrix products and convolutions, in GFLOP/s (float32, and bfloat16 if asked).

The ms-1.7b UNet's layers at the default video (16 frames, 32x32 latents, batch 2 for guidance), each run alone
through PyTorch's direct kernels (what diffusers' pipeline calls) and, for convolutions, through vidsynth's Winograd
path, next to one large square matrix product. Winograd rows count the direct convolution's FLOPs, so their rate is
what a direct kernel would need to match them. What a whole guided step achieves (its FLOPs over its time, from
versus_diffusers.py) can be read against these rates.

    python benchmarks/cpu_kernels.py [--dtype float32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from vidsynth.convolution import winograd_conv2d  # noqa: E402
from vidsynth.cpu_memory import freed_memory_reused  # noqa: E402

FRAMES, BATCH = 16, 2
LEVELS = ((320, 32), (640, 16), (1280, 8), (1280, 4))  # channels, latent side at each UNet level


def seconds(run, repeats: int = 3) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def cases(dtype: torch.dtype):
    """(name, FLOPs, run) for each row; run is None where vidsynth does not run that path in `dtype` (Winograd: float32
    only)."""
    def randn(*shape):
        return torch.randn(*shape).to(dtype)

    def winograd(run):
        return run if dtype == torch.float32 else None

    square = randn(4096, 4096)
    yield "matrix product 4096 x 4096 x 4096", 2 * 4096 ** 3, lambda: square @ square
    for channels, side in LEVELS:
        tokens = BATCH * FRAMES * side * side
        x = randn(tokens, channels)
        for out in (channels, 8 * channels):  # attention projections; the feed-forward's GEGLU projection
            w = randn(out, channels)
            yield f"linear {tokens} x {channels} -> {out}", 2 * tokens * channels * out, lambda x=x, w=w: F.linear(x, w)
        images = randn(BATCH * FRAMES, channels, side, side)
        kernel = randn(channels, channels, 3, 3)
        yield (f"3x3 convolution, {channels} channels, {side}x{side}", 2 * images.numel() * channels * 9,
               lambda i=images, k=kernel: F.conv2d(i, k, padding=1))
        yield (f"3x3 convolution, {channels} channels, {side}x{side}, Winograd (direct-equivalent)",
               2 * images.numel() * channels * 9, winograd(lambda i=images, k=kernel: winograd_conv2d(i, k, None)))
        # the temporal (3, 1, 1) convolution as vidsynth runs it on the CPU: a (3, 1) 2-D convolution over frames
        video = randn(BATCH, channels, FRAMES, side * side)
        kernel = randn(channels, channels, 3, 1)
        yield (f"temporal convolution, {channels} channels, {side}x{side}", 2 * video.numel() * channels * 3,
               lambda v=video, k=kernel: F.conv2d(v, k, padding=(1, 0)))
        yield (f"temporal convolution, {channels} channels, {side}x{side}, Winograd (direct-equivalent)",
               2 * video.numel() * channels * 3, winograd(lambda v=video, k=kernel: winograd_conv2d(v, k, None)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                        help="a column per dtype given (default: float32)")
    dtypes = [getattr(torch, name) for name in parser.parse_args().dtype or ["float32"]]
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}\n")
    print(f"| operation (the UNet's shapes at 16x256x256, batch 2) | {' | '.join(f'{n} GFLOP/s' for n in names)} |")
    print(f"|---|{'---|' * len(dtypes)}")
    with torch.inference_mode(), freed_memory_reused():  # as the pipeline runs them
        for rows in zip(*(cases(dtype) for dtype in dtypes)):
            rates = [f"{flops / seconds(run) / 1e9:.0f}" if run else "-" for _, flops, run in rows]
            print(f"| {rows[0][0]} | {' | '.join(rates)} |", flush=True)


if __name__ == "__main__":
    main()
