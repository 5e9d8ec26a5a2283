"""Encoding a generation's texts (its negative prompt, the empty prompt and its prompt, as `Pipeline.generate` does)
with the full-size text encoder: ms-1.7b's configuration, random weights, float32, on the CPU. To compare two
versions of vidsynth, run it with PYTHONPATH set to each one's `src` folder in turn.

    python benchmarks/text_encoding.py [--runs 7] [--prompt TEXT] [--negative TEXT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, cpu_name  # noqa: E402
from versus_diffusers import full_size_text_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs, after one untimed")
    parser.add_argument("--prompt", default="a red circle moving left on a black background")
    parser.add_argument("--negative", default="", help="the negative prompt (default empty, as ModelScope's)")
    args = parser.parse_args()

    from vidsynth.modelscope_format import openclip_tokenizer
    from vidsynth.text import encode_texts

    torch.manual_seed(0)
    encoder = full_size_text_encoder(torch.float32).eval()
    tokenizer, texts, cpu = openclip_tokenizer(), [args.negative, "", args.prompt], torch.device("cpu")
    seconds = []
    with torch.inference_mode():
        for run in range(args.runs + 1):
            started = time.perf_counter()
            encode_texts(tokenizer, encoder, texts, cpu)
            if run:
                seconds.append(time.perf_counter() - started)
    print(f"Command: `{command_line()}`  \nMachine: {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; date {date.today()}.")
    print(f"text encoding: median {statistics.median(seconds):.3f} s, range {min(seconds):.3f}-{max(seconds):.3f} s "
          f"over {args.runs} runs")


if __name__ == "__main__":
    main()
