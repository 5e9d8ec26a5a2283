"""The side-by-side benchmark against diffusers runs end to end and reports what BENCHMARKS.md's tables show.

A subprocess: the benchmark times DDIM steps by wrapping diffusers' `DDIMScheduler.step` for its whole process."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
STEPS = 3


def test_versus_diffusers_times_every_phase_and_makes_the_same_video(tmp_path):
    report_path = tmp_path / "report.json"
    command = [sys.executable, str(BENCHMARKS / "versus_diffusers.py"), "--model", "vidsynth-tiny", "--dtype",
               "float32", "--frames", "8", "--height", "32", "--width", "32", "--guidance", "4", "--steps",
               str(STEPS), "--warmup-steps", "1", "--runs", "1", "--json", str(report_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(report_path.read_text())

    assert report["settings"]["steps"] == STEPS and report["warmup_steps"] == 1
    for name in ("vidsynth", "diffusers"):
        run = report["median"][name]
        assert 0 < run["text"] and 0 < run["decode"] and 0 < run["encode"] and 0 < run["peak_gib"]
        assert 0 < run["denoise"] < run["total"]
        # the steps after the first are timed between the ends of consecutive steps, within the denoising time
        assert 0 < run["later_step"] * (STEPS - 1) < run["denoise"]
    assert report["median"]["ratio_total"] > 0
    # the same model, settings and seed in float32: the same video, but for rounding
    assert report["max_pixel_difference"] <= 2 and report["mean_pixel_difference"] < 0.05
    assert "| a step after the first, median (s) |" in finished.stdout
