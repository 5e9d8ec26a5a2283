"""One guided UNet forward of the full-size configuration under each way of running it: time, peak memory and
difference from diffusers' own eager forward, then where an eager forward's GPU time goes, with and without
channels-last convolution weights.

    python benchmarks/unet_variants.py                   # CUDA, float16, 16 frames 256x256 (32x32 latents)
    python benchmarks/unet_variants.py --compiled        # also the torch.compile variants (minutes each)
    python benchmarks/unet_variants.py --compiled --skip "3-D"    # leave out variants whose names contain this
    python benchmarks/unet_variants.py --compiled --only compiled  # only the compiled variants (and the reference)
    python benchmarks/unet_variants.py --compiled --only "frozen"  # one compiled variant (about two minutes)
    python benchmarks/unet_variants.py --device cpu --dtype float32 --frames 2 --size 8 --repeats 1
    python benchmarks/unet_variants.py --device cpu --dtype bfloat16 --compiled --only compiled --skip 3-D \
        --skip cudnn --skip frozen --skip coordinate --repeats 3  # on the CPU: the compiled path, and max-autotune
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from versus_diffusers import full_size_components  # noqa: E402


@dataclass(frozen=True)
class Variant:
    per_video_text: bool = True  # the prompt projected once per video (vidsynth's attention processor)
    cudnn_benchmark: bool = False
    temporal_2d: bool = False  # temporal convolutions as 2-D ones
    graph: bool = False  # replayed from a CUDA graph of the eager kernels
    channels_last: bool = False  # convolution weights channels-last
    compiled: bool = False  # torch.compile as the pipeline compiles: on CUDA replayed from CUDA graphs, else frozen
    autotune: bool = False  # compiled with max-autotune: inductor times its own kernels against the vendor ones
    inductor: tuple = ()  # (name, value) pairs of inductor's config, set while it compiles


VARIANTS = {
    "diffusers' attention processors, eager": Variant(per_video_text=False),
    "vidsynth's text attention, eager": Variant(),
    "+ cudnn.benchmark": Variant(cudnn_benchmark=True),
    "+ temporal convolutions as 2-D": Variant(temporal_2d=True),
    "+ channels-last convolution weights": Variant(channels_last=True),
    "+ channels-last + temporal 2-D": Variant(channels_last=True, temporal_2d=True),
    "+ CUDA graph (vidsynth's default on CUDA)": Variant(graph=True),
    "+ CUDA graph + temporal 2-D": Variant(graph=True, temporal_2d=True),
    "+ CUDA graph + channels-last convolution weights": Variant(graph=True, channels_last=True),
    "+ CUDA graph + channels-last + temporal 2-D": Variant(graph=True, channels_last=True, temporal_2d=True),
    "diffusers' attention processors + CUDA graph": Variant(per_video_text=False, graph=True),
    "compiled, 3-D temporal convolutions": Variant(compiled=True),
    "compiled + temporal 2-D (vidsynth's --compile)": Variant(compiled=True, temporal_2d=True),
    "compiled + temporal 2-D + cudnn.benchmark": Variant(compiled=True, temporal_2d=True, cudnn_benchmark=True),
    "compiled with max-autotune + temporal 2-D": Variant(compiled=True, temporal_2d=True, autotune=True),
    # Weights folded into the graph as constants, laid out once for the kernels that read them (on the CPU always).
    "compiled + temporal 2-D + frozen weights": Variant(compiled=True, temporal_2d=True,
                                                        inductor=(("freezing", True),)),
    # Inductor tunes its generated kernels' block sizes by timing neighbours (cheaper than max-autotune).
    "compiled + temporal 2-D + coordinate-descent tuning": Variant(compiled=True, temporal_2d=True,
                                                                   inductor=(("coordinate_descent_tuning", True),)),
}


@contextlib.contextmanager
def channels_last_convolutions(unet: torch.nn.Module):
    """Convolution weights in channels-last layout, so that the activations follow and cuDNN's NHWC kernels need no
    layout conversion per call (8.5 of an eager forward's 55 ms of kernels were NCHW->NHWC conversions on an H200).
    The group norms between convert back (PyTorch's group norm on CUDA takes contiguous tensors), so eagerly the
    conversions only move: the profile printed last shows them as copies."""
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


def compiled_forward(unet: torch.nn.Module, device: torch.device, autotune: bool = False, inductor: tuple = ()):
    """A fresh torch.compile of the UNet as the pipeline compiles it on `device` (or with max-autotune, which on
    CUDA also replays CUDA graphs, and on the CPU also freezes the weights), with `inductor`'s config settings while
    it compiles. Prints whether inductor's heuristic stores the activations channels-last (it does so only around
    2-D convolutions), then the first call's time."""
    from torch._dynamo import reset
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    from vidsynth.caching import noise_prediction
    from vidsynth.pipeline import compile_unet

    reset()
    cuda = device.type == "cuda"
    if autotune and not cuda:
        inductor = inductor + (("freezing", True),)  # as compile_unet freezes on the CPU
    compiled = (torch.compile(unet, mode="max-autotune", dynamic=False) if autotune else compile_unet(unet, device))
    forward = noise_prediction(compiled)
    decide = GraphLowering.decide_layout_opt

    def reported(gm, *, is_inference):
        verdict = decide(gm, is_inference=is_inference)
        print(f"  inductor's layout heuristic: channels-last {'yes' if verdict else 'no'}", flush=True)
        return verdict

    first = [True]

    def step(*inputs):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        if not first[0]:
            return forward(*inputs)
        first[0] = False
        started = time.perf_counter()
        GraphLowering.decide_layout_opt = staticmethod(reported)
        try:
            with inductor_config.patch(dict(inductor)):  # compiling happens inside the first call
                out = forward(*inputs)
        finally:
            GraphLowering.decide_layout_opt = staticmethod(decide)
        if cuda:
            torch.cuda.synchronize()
        print(f"  first call (compiling): {time.perf_counter() - started:.0f} s", flush=True)
        return out
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per variant, after 3 warm-ups")
    parser.add_argument("--compiled", action="store_true", help="also the torch.compile variants (minutes each)")
    parser.add_argument("--skip", action="append", default=[], help="leave out variants whose names contain this "
                        "(repeatable); the first variant always runs, as the reference")
    parser.add_argument("--only", help="run only the variants whose names contain this (and the first)")
    args = parser.parse_args()

    from vidsynth.attention import text_attention_per_video
    from vidsynth.caching import noise_prediction
    from vidsynth.convolution import rewritten_convolutions
    from vidsynth.cuda_graphs import CudaGraphedForward

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    unet = full_size_components(dtype, device).unet.to(device)
    generator = torch.Generator("cpu").manual_seed(0)
    inputs = (torch.randn(2, 4, args.frames, args.size, args.size, generator=generator).to(device, dtype),
              torch.tensor(501, device=device), torch.randn(2, 77, 1024, generator=generator).to(device, dtype))
    plain = noise_prediction(unet)
    names = list(VARIANTS)
    chosen = [name for name in names if args.compiled or not VARIANTS[name].compiled]
    chosen = [name for name in chosen if name == names[0] or not any(part in name for part in args.skip)
              and (args.only is None or args.only in name)]

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
        for name in chosen:
            variant = VARIANTS[name]
            with contextlib.ExitStack() as stack:
                if variant.channels_last:
                    stack.enter_context(channels_last_convolutions(unet))
                if variant.per_video_text:
                    stack.enter_context(text_attention_per_video(unet, args.frames))
                if variant.temporal_2d:
                    stack.enter_context(rewritten_convolutions(unet, winograd=False))
                torch.backends.cudnn.benchmark = variant.cudnn_benchmark
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                if variant.compiled:
                    forward = compiled_forward(unet, device, variant.autotune, variant.inductor)
                else:
                    forward = CudaGraphedForward(plain) if variant.graph else plain
                ms, out = timed(forward)
                del forward
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            reference = out if reference is None else reference
            print(f"| {name} | {ms:.1f} | {peak:.2f} | {(out - reference).abs().max():.1e} "
                  f"(output std {reference.std():.3f}) |", flush=True)
        torch.backends.cudnn.benchmark = previous_benchmark
        if cuda:
            for channels_last in (False, True):
                profile_eager(unet, plain, inputs, args.frames, channels_last)


def profile_eager(unet, plain, inputs, frames: int, channels_last: bool) -> None:
    """How long the CPU takes to launch an eager forward against how long its kernels run, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from vidsynth.attention import text_attention_per_video
    with (text_attention_per_video(unet, frames),
          channels_last_convolutions(unet) if channels_last else contextlib.nullcontext()):
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
    print(f"\neager forward{', channels-last convolution weights' if channels_last else ''}: {launched * 1000:.1f} ms "
          f"to launch on the CPU, {done * 1000:.1f} ms until done; {len(kernels)} kernels, {busy:.1f} ms of GPU time\n")
    print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
