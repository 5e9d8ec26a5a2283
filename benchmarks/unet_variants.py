"""One guided UNet forward of the full-size configuration under each way of running it: time, peak memory and
difference from diffusers' own eager forward, then where an eager forward's GPU time goes.

    python benchmarks/unet_variants.py                   # CUDA, float16, 16 frames 256x256 (32x32 latents)
    python benchmarks/unet_variants.py --device cpu --dtype float32 --frames 2 --size 8 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from versus_diffusers import full_size_components  # noqa: E402

# name: (prompt projected once per video, cudnn.benchmark, temporal convolutions as 2-D, CUDA graph,
#        convolution weights channels-last)
VARIANTS = {
    "diffusers' attention processors, eager": (False, False, False, False, False),
    "vidsynth's text attention, eager": (True, False, False, False, False),
    "+ cudnn.benchmark": (True, True, False, False, False),
    "+ temporal convolutions as 2-D": (True, False, True, False, False),
    "+ channels-last convolution weights": (True, False, False, False, True),
    "+ CUDA graph (vidsynth's default on CUDA)": (True, False, False, True, False),
    "+ CUDA graph + temporal 2-D": (True, False, True, True, False),
    "+ CUDA graph + temporal 2-D + cudnn.benchmark": (True, True, True, True, False),
    "+ CUDA graph + channels-last convolution weights": (True, False, False, True, True),
    "diffusers' attention processors + CUDA graph": (False, False, False, True, False),
}


@contextlib.contextmanager
def channels_last_convolutions(unet: torch.nn.Module):
    """Convolution weights in channels-last layout, so that the activations follow and cuDNN's NHWC kernels need no
    layout conversion per call (8.5 of an eager forward's 55 ms of kernels were NCHW->NHWC conversions on an H200);
    whether the group norms between convert back is what this variant measures."""
    convolutions = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    originals = [m.weight.data for m in convolutions]
    for module in convolutions:
        layout = torch.channels_last if module.weight.dim() == 4 else torch.channels_last_3d
        module.weight.data = module.weight.data.contiguous(memory_format=layout)
    try:
        yield
    finally:
        for module, weight in zip(convolutions, originals):
            module.weight.data = weight


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per variant, after 3 warm-ups")
    args = parser.parse_args()

    from vidsynth.attention import text_attention_per_video
    from vidsynth.caching import noise_prediction
    from vidsynth.convolution import cpu_convolutions
    from vidsynth.cuda_graphs import CudaGraphedForward

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    unet = full_size_components(dtype, device).unet.to(device)
    generator = torch.Generator("cpu").manual_seed(0)
    inputs = (torch.randn(2, 4, args.frames, args.size, args.size, generator=generator).to(device, dtype),
              torch.tensor(501, device=device), torch.randn(2, 77, 1024, generator=generator).to(device, dtype))
    plain = noise_prediction(unet)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(forward):
        for _ in range(3):
            forward(*inputs)
        sync()
        started = time.perf_counter()
        for _ in range(args.repeats):
            out = forward(*inputs)
        sync()
        return (time.perf_counter() - started) / args.repeats * 1000, out.float()

    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, {args.dtype}, {date.today()}: "
          f"one guided forward (batch 2) at {args.frames} frames, {args.size}x{args.size} latents\n")
    print("| variant | ms per forward | peak memory (GiB) | max difference from the first |\n|---|---|---|---|")
    reference = None
    previous_benchmark = torch.backends.cudnn.benchmark
    with torch.inference_mode():
        for name, (per_video, benchmark, temporal_2d, graph, channels_last) in VARIANTS.items():
            with contextlib.ExitStack() as stack:
                if channels_last:
                    stack.enter_context(channels_last_convolutions(unet))
                if per_video:
                    stack.enter_context(text_attention_per_video(unet, args.frames))
                if temporal_2d:
                    stack.enter_context(cpu_convolutions(unet, winograd=False))
                torch.backends.cudnn.benchmark = benchmark
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                ms, out = timed(CudaGraphedForward(plain) if graph else plain)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            reference = out if reference is None else reference
            print(f"| {name} | {ms:.1f} | {peak:.2f} | {(out - reference).abs().max():.1e} "
                  f"(output std {reference.std():.3f}) |", flush=True)
        torch.backends.cudnn.benchmark = previous_benchmark
        if cuda:
            profile_eager(unet, plain, inputs, args.frames)


def profile_eager(unet, plain, inputs, frames: int) -> None:
    """How long the CPU takes to launch an eager forward against how long its kernels run, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from vidsynth.attention import text_attention_per_video
    with text_attention_per_video(unet, frames):
        plain(*inputs)
        torch.cuda.synchronize()
        started = time.perf_counter()
        plain(*inputs)
        launched = time.perf_counter() - started
        torch.cuda.synchronize()
        done = time.perf_counter() - started
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            plain(*inputs)
            torch.cuda.synchronize()
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1000
    print(f"\neager forward: {launched * 1000:.1f} ms to launch on the CPU, {done * 1000:.1f} ms until done; "
          f"{len(kernels)} kernels, {busy:.1f} ms of GPU time\n")
    print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=18))


if __name__ == "__main__":
    main()
