"""vidsynth against diffusers' TextToVideoSDPipeline, side by side on the same components and settings.

Both pipelines share one set of modules (UNet, VAE, text encoder, tokenizer) in one dtype on one device, use DDIM
with ModelScope's schedule, the same seed (CPU generator), steps, guidance, frames and size. One warm-up run each
(reported apart), then alternating timed runs. Text encoding and decoding are timed by hooks on the shared modules
and denoising is the rest of the run, so both sides are measured the same way. Prints a Markdown table and writes
JSON.

    python benchmarks/versus_diffusers.py                      # full-size ms-1.7b configuration, random weights
    python benchmarks/versus_diffusers.py --model ms-1.7b      # any --model reference
    python benchmarks/versus_diffusers.py --frames 8 --steps 3 --runs 2 --json out.json
    python benchmarks/versus_diffusers.py --device cuda --dtype float16 --compile   # GPU fast path
    python benchmarks/versus_diffusers.py --model vidsynth-tiny --dtype float16 --reference-dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402

# UNet FLOPs of one forward at 16 frames x 32x32 latents, batch 2 (CFG), and of decoding 16 frames to 256x256.
UNET_TFLOP_16x32x32_BATCH2 = 9.77
VAE_TFLOP_16_FRAMES_256 = 9.96
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ROW_LABELS = {"denoise": "denoise, all steps (s)", "later_step": "a step after the first, median (s)",
              "peak_gib": "peak memory (GiB)"}


def random_fill(module: torch.nn.Module) -> torch.nn.Module:
    """The module's weights drawn in place from N(0, 0.02), for a full-size model without a checkpoint."""
    for parameter in module.parameters():
        parameter.data.normal_(0, 0.02)
    return module


def full_size_vae(dtype: torch.dtype):
    """ms-1.7b's VAE (Stable Diffusion's configuration) with diffusers' random initial weights."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        scaling_factor=0.18215)
    return vae.to(dtype).eval().requires_grad_(False)


def full_size_text_encoder(dtype: torch.dtype):
    """OpenCLIP ViT-H-14's text tower up to the block ModelScope reads, as the diffusers port configures it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                                        max_position_embeddings=77, projection_dim=1024)).to(dtype)


def full_size_components(dtype: torch.dtype, device: torch.device = torch.device("cpu")):
    """ms-1.7b's configuration (the same as the diffusers port's config files) with random weights, the UNet's drawn
    on `device` (1.7B normal draws take a minute on a CPU)."""
    from vidsynth.loading import Components
    from vidsynth.modelscope_format import MS_1_7B, openclip_tokenizer, unet_from_config
    from vidsynth.request import ModelDefaults

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = unet_from_config(MS_1_7B)
    unet = random_fill(unet.to_empty(device=device).to(dtype))
    vae = full_size_vae(dtype)
    text = full_size_text_encoder(dtype)
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return Components(tokenizer=openclip_tokenizer(), text_encoder=text, unet=unet, vae=vae, schedule=None,
                      defaults=ModelDefaults(), name="ms-1.7b configuration (random weights)")


class PhaseTimer:
    """Seconds spent encoding text and decoding frames during a run, from forward hooks (with a device sync on CUDA).

    The UNet carries no hooks (a compiled or CUDA-graphed UNet must not synchronise inside its step): denoising is
    the rest of the run before encoding, the sampler's arithmetic included, for both pipelines alike. On the CPU the
    time between the ends of consecutive DDIM steps (both pipelines call `DDIMScheduler.step` once a step) is also
    kept: the first step pays one-off costs (a fresh process's or a trimmed heap's memory faulted in), so the later
    steps' median is what a 50-step video mostly costs. On CUDA that would need a sync a step, which changes the time.
    """

    def __init__(self, components, device: torch.device):
        self.device, self.seconds, self.started, self.step_ends = device, defaultdict(float), {}, []
        for phase, module in [("text", components.text_encoder), ("decode", components.vae.decoder)]:
            module.register_forward_pre_hook(lambda m, a, phase=phase: self._start(phase))
            module.register_forward_hook(lambda m, a, o, phase=phase: self._stop(phase))
        if device.type == "cpu":
            from diffusers import DDIMScheduler

            step = DDIMScheduler.step

            def timed_step(scheduler, *args, **kwargs):
                output = step(scheduler, *args, **kwargs)
                self.step_ends.append(time.perf_counter())
                return output
            DDIMScheduler.step = timed_step

    def later_step_median(self) -> float | None:
        """The median seconds of the run's steps after its first (None with fewer than 2 steps, or on CUDA)."""
        gaps = [end - start for start, end in zip(self.step_ends, self.step_ends[1:])]
        return statistics.median(gaps) if gaps else None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _start(self, phase):
        self._sync()
        self.started[phase] = time.perf_counter()

    def _stop(self, phase):
        self._sync()
        self.seconds[phase] += time.perf_counter() - self.started[phase]

    def reset(self):
        self.seconds, self.step_ends = defaultdict(float), []


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set size


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return _resident_gib("VmHWM")


def memory_now_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**30
    return _resident_gib("VmRSS")


def _resident_gib(field: str) -> float:
    """A Linux process's resident set size (VmRSS) or its peak (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 2**20


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device and video settings the benchmarks on the full-size configuration share."""
    parser.add_argument("--model", help="any vidsynth --model reference (default: random full-size weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--guidance", type=float, default=9.0)


def components_for(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    from vidsynth.loading import load_components
    return load_components(args.model, dtype=dtype) if args.model else full_size_components(dtype, device)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_video_arguments(parser)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each pipeline")
    parser.add_argument("--warmup-steps", type=int, help="steps of the warm-up runs (default: --steps); the same "
                        "video shape, so compiling and first-time costs fall in them all the same")
    parser.add_argument("--compile", action="store_true", help="vidsynth with --compile (its compile time is in the "
                        "warm-up run)")
    parser.add_argument("--decode-chunk", type=int, help="frames vidsynth's VAE decodes at a time (default: its own "
                        "choice for the device; diffusers decodes all at once)")
    parser.add_argument("--reference-dtype", help="with --model: also make the video once with vidsynth in this dtype "
                        "(float32) and report how far each pipeline's video is from it")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.reference_dtype and not args.model:
        parser.error("--reference-dtype needs --model (random weights drawn in another dtype would differ)")

    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    from vidsynth.devices import dtype_name, resolve_device, resolve_dtype
    from vidsynth.pipeline import Pipeline
    from vidsynth.schedulers import MODELSCOPE_SCHEDULE
    from vidsynth.video import write_video

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = components_for(args, dtype, device)
    ours = Pipeline(components, device, dtype, compile=args.compile, decode_chunk=args.decode_chunk)
    theirs = TextToVideoSDPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=components.unet,
                                   scheduler=DDIMScheduler.from_config(components.schedule or MODELSCOPE_SCHEDULE))
    theirs.set_progress_bar_config(disable=True)
    timer = PhaseTimer(components, device)
    prompt, seed = "A car flying in space.", 0
    settings = dict(frames=args.frames, height=args.height, width=args.width, steps=args.steps, guidance=args.guidance)
    # diffusers guides every step; a model's own defaults may guide only the first ones (the shipped model's do)
    sampled_as_diffusers_does = dict(scheduler="ddim", guidance_fraction=1.0, progress=False)

    def run_ours(steps=args.steps):
        return ours(prompt, seed=seed, **sampled_as_diffusers_does, **{**settings, "steps": steps}).frames

    def run_theirs(steps=args.steps):
        output = theirs(prompt, num_inference_steps=steps, guidance_scale=args.guidance, num_frames=args.frames,
                        height=args.height, width=args.width, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(seed))
        return (np.asarray(output.frames[0]) * 255).round().clip(0, 255).astype(np.uint8)

    results = {"vidsynth": [], "diffusers": []}
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        def measured(name, run):
            timer.reset()
            reset_peak_memory(device)
            started = time.perf_counter()
            frames = run()
            encode_started = time.perf_counter()
            write_video(Path(folder) / f"{name}.mp4", frames, 8, {}, sidecar=False)
            finished = time.perf_counter()
            outputs[name] = frames
            timer.seconds["denoise"] = encode_started - started - timer.seconds["text"] - timer.seconds["decode"]
            return {"total": finished - started, "encode": finished - encode_started, **timer.seconds,
                    "later_step": timer.later_step_median(), "peak_gib": peak_memory_gib(device)}

        warmup_steps = args.warmup_steps or args.steps
        warmup = {"vidsynth": measured("vidsynth", lambda: run_ours(warmup_steps)),
                  "diffusers": measured("diffusers", lambda: run_theirs(warmup_steps))}
        for _ in range(args.runs):
            results["diffusers"].append(measured("diffusers", run_theirs))
            results["vidsynth"].append(measured("vidsynth", run_ours))

    differences = np.abs(outputs["vidsynth"].astype(int) - outputs["diffusers"])
    difference, mean_difference = int(differences.max()), float(differences.mean())
    from_reference = {}
    if args.reference_dtype:
        reference_dtype = resolve_dtype(args.reference_dtype, device)
        reference = Pipeline(components_for(args, reference_dtype, device), device, reference_dtype)
        frames = reference(prompt, seed=seed, **sampled_as_diffusers_does, **settings).frames
        for name, made in outputs.items():
            away = np.abs(made.astype(int) - frames)
            from_reference[name] = {"max": int(away.max()), "mean": float(away.mean())}
    summary = {name: {key: statistics.median(run[key] for run in runs) if runs[0][key] is not None else None
                      for key in runs[0]} for name, runs in results.items()}
    summary["ratio_total"] = summary["vidsynth"]["total"] / summary["diffusers"]["total"]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    if gpu:
        latent_voxels = args.frames * (args.height // 8) * (args.width // 8)
        tflop = (UNET_TFLOP_16x32x32_BATCH2 * latent_voxels / (16 * 32 * 32) * args.steps
                 + VAE_TFLOP_16_FRAMES_256 * args.frames * args.height * args.width / (16 * 256 * 256))
        peak = next((value for key, value in PEAK_TFLOPS.items() if key in gpu), None)
        for name in ("vidsynth", "diffusers"):
            summary[name]["tflops"] = tflop / summary[name]["total"]
            summary[name]["fraction_of_peak"] = summary[name]["tflops"] / peak if peak else None
    report = {"date": str(date.today()), "machine": gpu or f"{cpu_name()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "python": platform.python_version(),
              "model": components.name, "dtype": dtype_name(dtype), "settings": settings,
              "decode_chunk": ours.frames_per_chunk(args.height, args.width), "runs": args.runs,
              "warmup_steps": warmup_steps, "warmup": warmup,
              "results": results, "median": summary, "max_pixel_difference": difference,
              "mean_pixel_difference": mean_difference,
              "mean_pixel_value": {name: float(frames.mean()) for name, frames in outputs.items()},
              "difference_from_reference": {"dtype": args.reference_dtype, **from_reference},
              "command": command_line()}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")

    print(f"Command: `{report['command']}`  \nMachine: {report['machine']}, torch {torch.__version__}; "
          f"date {report['date']}. Model: {components.name}, {dtype_name(dtype)}, {settings}, DDIM.\n")
    keys = (["total", "text", "denoise", "later_step", "decode", "encode", "peak_gib"]
            + (["tflops", "fraction_of_peak"] if gpu else []))
    print("| median of %d runs | vidsynth | diffusers | vidsynth / diffusers |\n|---|---|---|---|" % args.runs)
    for key in keys:
        a, b = summary["vidsynth"].get(key), summary["diffusers"].get(key)
        label = ROW_LABELS.get(key, key + ("" if key in ("tflops", "fraction_of_peak") else " (s)"))
        ratio = f"{a / b:.2f}" if a and b else "-"
        measured_both = a is not None and b is not None
        print(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |" if measured_both else f"| {label} | - | - | - |")
    print(f"| warm-up total, {warmup_steps} steps (s) | {warmup['vidsynth']['total']:.3f} | "
          f"{warmup['diffusers']['total']:.3f} | |")
    print(f"\npixel difference between the two videos: max {difference}/255, mean {mean_difference:.2f}/255 "
          f"(mean pixel value: vidsynth {outputs['vidsynth'].mean():.1f}, diffusers {outputs['diffusers'].mean():.1f})")
    for name, away in from_reference.items():
        print(f"{name}: video against vidsynth's in {args.reference_dtype}: max {away['max']}/255, "
              f"mean {away['mean']:.2f}/255")


if __name__ == "__main__":
    main()
