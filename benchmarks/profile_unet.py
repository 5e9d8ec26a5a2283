"""Where one guided UNet step spends its time: vidsynth's pipeline, profiled for one DDIM step.

Runs the pipeline (warm-up first) on the full-size ms-1.7b configuration with random weights, or any --model, and
profiles the UNet's forward passes only (hooks start and stop the profiler). Prints the time per kind of operator,
the attention calls by shape with the rate each achieved, and the top operators.

    python benchmarks/profile_unet.py --frames 8 --height 128 --width 128
    python benchmarks/profile_unet.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from versus_diffusers import add_video_arguments, components_for  # noqa: E402

# operator name fragments -> kind; the first match wins
KINDS = [("convolution", "convolution"), ("matrix product", "addmm"), ("matrix product", "aten::mm"),
         ("matrix product", "bmm"), ("attention", "attention"), ("normalisation", "norm"),
         ("copies and layout", "copy_"), ("copies and layout", "contiguous")]


def kind_of(name: str) -> str:
    return next((kind for kind, fragment in KINDS if fragment in name), "elementwise and other")


def main() -> None:
    parser = argparse.ArgumentParser()
    add_video_arguments(parser)
    args = parser.parse_args()

    from vidsynth.devices import resolve_device, resolve_dtype
    from vidsynth.pipeline import Pipeline

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipeline = Pipeline(components_for(args, dtype, device), device, dtype)
    pipeline.unet_forward = None  # eager: the hooks below synchronise, which a CUDA graph (same kernels) cannot hold
    settings = dict(frames=args.frames, height=args.height, width=args.width, steps=1, guidance=args.guidance,
                    scheduler="ddim", seed=0, progress=False)
    pipeline("profile", **settings)  # warm-up

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities, record_shapes=True)
    unet = pipeline.components.unet

    def stop(*_) -> None:  # a forward hook that returned something would replace the UNet's output
        if cuda:
            torch.cuda.synchronize()
        profiler.stop()

    unet.register_forward_pre_hook(lambda *_: profiler.start())
    unet.register_forward_hook(stop)
    pipeline("profile", **settings)

    events = profiler.key_averages()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) / 1e6
    by_kind = defaultdict(float)
    for event in events:
        by_kind[kind_of(event.key)] += self_time(event) / 1e6

    where = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"One guided UNet forward (batch 2), {args.frames} frames {args.height}x{args.width}, {dtype}, on {where}, "
          f"torch {torch.__version__}, {date.today()}: {total:.3f} s of {'GPU' if cuda else 'CPU'} time\n")
    print("| kind of operator | seconds | share |\n|---|---|---|")
    for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {seconds:.3f} | {seconds / total:.1%} |")
    print()
    attention_by_shape(profiler, cuda)
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15))


def attention_by_shape(profiler, cuda: bool) -> None:
    """The scaled-dot-product attention calls grouped by shape, with their time and achieved rate (4 x batch x heads x
    queries x keys x head size FLOP a call): the UNet's attention runs at very different rates by sequence length."""
    calls = [event for event in profiler.key_averages(group_by_input_shape=True)
             if event.key == "aten::scaled_dot_product_attention"]
    seconds = (lambda e: e.device_time_total / 1e6) if cuda else (lambda e: e.cpu_time_total / 1e6)
    print("| queries (batch, heads, tokens, head size) | keys | calls | seconds | GFLOP/s |\n|---|---|---|---|---|")
    for event in sorted(calls, key=seconds, reverse=True):
        (batch, heads, queries, head_size), keys = event.input_shapes[0], event.input_shapes[1][2]
        rate = 4 * batch * heads * queries * keys * head_size * event.count / seconds(event) / 1e9
        print(f"| {tuple(event.input_shapes[0])} | {keys} | {event.count} | {seconds(event):.3f} | {rate:.0f} |")
    print(f"\nattention in all: {sum(seconds(event) for event in calls):.3f} s\n")


if __name__ == "__main__":
    main()
