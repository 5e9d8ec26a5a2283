"""How long the shipped model takes from command to video file, as a user sees it.

Runs `vidsynth generate PROMPT -o FILE` in a fresh process several times (Python start, imports, model loading,
generation and encoding all included), then times the phases in one process. Prints a Markdown table.

    python benchmarks/shipped_model.py [--runs 5] [--dtype auto]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

PROMPT = "a red circle moving left on a black background"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    totals = []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs + 1):  # the first run warms the disk cache and is not counted
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vidsynth.cli", "generate", PROMPT, "--seed", str(run),
                            "--dtype", args.dtype, "-o", os.path.join(folder, f"{run}.mp4")],
                           check=True, capture_output=True)
            if run:
                totals.append(time.perf_counter() - started)

    import vidsynth
    started = time.perf_counter()
    # vidsynth imports these on the first load (commands that load no model never pay for them); timed on their own
    # so that the loading row is the loading.
    from diffusers import AutoencoderKL, UNet3DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401
    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pipeline = vidsynth.load(dtype=args.dtype)
    load_seconds = time.perf_counter() - started
    marks = {}  # (phase, step) -> when that event arrived; events come after each step is done

    def record(event):
        marks[event.phase, event.step] = time.perf_counter()

    encode_start = time.perf_counter()
    pipeline.generate(vidsynth.GenerationRequest(prompt=PROMPT, seed=0), record)
    last = {phase: max(t for (p, _), t in marks.items() if p == phase) for phase, _ in marks}
    video = pipeline(PROMPT, seed=0, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        video.save(os.path.join(folder, "clip.mp4"))
        encode_seconds = time.perf_counter() - started

    d = pipeline.defaults
    print(f"Shipped model, {d.frames} frames {d.width}x{d.height}, {d.steps} DDIM steps, guidance {d.guidance} on "
          f"the first {d.guidance_fraction:.0%} of them, dtype {vidsynth.devices.dtype_name(pipeline.dtype)}; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {__import__('torch').__version__}, {date.today()}")
    print()
    print("| measure | seconds |")
    print("|---|---|")
    print(f"| `vidsynth generate` end to end, fresh process (median of {args.runs}) | {statistics.median(totals):.2f} |")
    print(f"| same, slowest run | {max(totals):.2f} |")
    print(f"| importing diffusers and transformers (in process) | {import_seconds:.2f} |")
    print(f"| model loading (in process) | {load_seconds:.2f} |")
    print(f"| text encoding | {last['encode'] - encode_start:.2f} |")
    print(f"| denoising ({d.steps} steps) | {last['denoise'] - last['encode']:.2f} |")
    print(f"| VAE decoding | {last['decode'] - last['denoise']:.2f} |")
    print(f"| MP4 encoding | {encode_seconds:.2f} |")


if __name__ == "__main__":
    main()
