"""Loading the full-size model from a ModelScope-layout folder, then a first video: seconds and memory, each run in a
fresh process.

Writes ms-1.7b's configuration with random weights as a ModelScope-layout folder, made with ModelScope's and
open_clip's own classes (the tests' reference code: `modelscope` and `open_clip_torch` installed as the README's test
setup does), then runs `vidsynth.load(folder, device="cpu", dtype="float32")` and a one-frame video in child processes (the
weights are memory-mapped from the files, so the first video is when they are read). The OpenCLIP file holds the
text tower only (the real one also holds the image tower, which is never read).

    python benchmarks/loading.py [--folder DIR] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from machine import command_line, cpu_name  # noqa: E402
from versus_diffusers import memory_now_gib, peak_memory_gib, random_fill  # noqa: E402


def write_folder(folder: Path) -> None:
    from reference_code import SD_VAE, modelscope_module, modelscope_unet, open_clip_transformer
    from vidsynth.modelscope_format import MS_1_7B

    def filled(module: torch.nn.Module) -> dict:
        return random_fill(module).state_dict()

    with torch.device("meta"):  # built empty: its initial weights would be overwritten anyway
        unet = modelscope_unet(MS_1_7B)
    torch.save(filled(unet.to_empty(device="cpu")), folder / "text2video_pytorch_model.pth")
    del unet
    vae = modelscope_module("autoencoder").AutoencoderKL(SD_VAE, 4)
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in filled(vae).items()}},
               folder / "VQGAN_autoencoder.pth")
    text = open_clip_transformer().TextTransformer(width=1024, heads=16, layers=24, output_dim=1024)
    torch.save(filled(text), folder / "open_clip_pytorch_model.bin")
    (folder / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "text-to-video-synthesis",
        "model": {"type": "latent-text-to-video-synthesis", "model_cfg": MS_1_7B}}))


def load_once(folder: Path) -> dict:
    """Load, then make a one-frame 64x64 video with one step, which reads every weight once."""
    import vidsynth
    started = time.perf_counter()
    pipeline = vidsynth.load(str(folder), device="cpu", dtype="float32")
    loaded = time.perf_counter()
    pipeline("A car flying in space.", frames=1, height=64, width=64, steps=1, seed=0, progress=False)
    return dict(load=loaded - started, first_video=time.perf_counter() - loaded,
                peak=peak_memory_gib(torch.device("cpu")), after=memory_now_gib(torch.device("cpu")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, help="where the ModelScope-layout folder is (written if missing)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # the child process's one load
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load_once(args.load)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch)
        if not (folder / "configuration.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_folder(folder)
        size = sum(path.stat().st_size for path in folder.iterdir()) / 2**30
        print(f"Command: `{command_line()}`  ")
        print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; date {date.today()}. "
              f"ms-1.7b configuration, random weights, ModelScope layout ({size:.2f} GiB of files), float32; "
              f"each run in a fresh process.\n")
        print("| run | loading (s) | first video, 1 frame 64x64, 1 step (s) | peak RSS (GiB) | RSS after (GiB) |\n"
              "|---|---|---|---|---|", flush=True)
        for run in range(1, args.runs + 1):
            child = subprocess.run([sys.executable, __file__, "--load", str(folder)], check=True,
                                   stdout=subprocess.PIPE, text=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"| {run} | {row['load']:.1f} | {row['first_video']:.1f} | {row['peak']:.2f} | {row['after']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
