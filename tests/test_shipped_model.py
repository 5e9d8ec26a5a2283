"""The model shipped in the package: the default of `vidsynth generate`, and it draws what the prompt says."""

import json
import subprocess
import sys

import av

import vidsynth
from vidsynth.cli import main
from vidsynth.data import training_specs, vocabulary
from vidsynth.evaluate import default_specs, evaluate
from vidsynth.registry import SHIPPED_MODEL, package_model_path


def test_shipped_model_is_small_and_complete():
    folder = package_model_path(SHIPPED_MODEL)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    assert (folder / "MODEL_CARD.md").is_file()
    assert json.loads((folder / "vidsynth.json").read_text())["defaults"]["frames"] == 16


def test_generate_without_model_uses_the_shipped_model(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vidsynth.cli", "generate",
                           "a yellow square moving right on a black background", "--seed", "1", "-o", "clip.mp4",
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["path"] == "clip.mp4" and result["warnings"] == []  # printed in full before the quick exit
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.frames, stream.width, stream.height, float(stream.average_rate)) == (16, 64, 64, 8)
        settings = json.loads(container.metadata["comment"])
    assert settings["model"] == SHIPPED_MODEL
    # The model's own sampling, from its vidsynth.json: guided on the first 3 of 6 steps (its model card).
    assert (settings["steps"], settings["guidance"], settings["guidance_fraction"]) == (6, 4.0, 0.5)


def test_the_shipped_model_names_the_words_of_a_prompt_it_never_saw(tmp_path, capsys):
    saved = json.loads((package_model_path(SHIPPED_MODEL) / "vidsynth.json").read_text())["vocabulary"]
    assert saved == sorted(vocabulary(spec.caption for spec in training_specs()))  # what it was trained on
    video = tmp_path / "car.mp4"
    assert main(["generate", "A car flying in space.", "--frames", "2", "--steps", "1", "-o", str(video),
                 "--json"]) == 0
    assert video.is_file()  # a warning, not an error
    printed = capsys.readouterr()
    warning = ("vidsynth-tiny never saw 'car', 'flying', 'in', 'space' in its training captions and cannot draw what "
               "they say; it knows: a, and, background, black, blue, circle,")
    assert f"vidsynth: warning: {warning}" in printed.err
    [result] = json.loads(printed.out)
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith(warning)
    assert main(["generate", "A Red circle, moving left on a black background!", "--frames", "2", "--steps", "1",
                 "-o", str(tmp_path / "circle.mp4")]) == 0
    assert "warning" not in capsys.readouterr().err  # case and punctuation are not words


def test_shipped_model_draws_the_asked_colour_shape_background_and_motion():
    """Held-out captions (never seen in training), at the shipped settings. Thresholds sit below what its model card
    measures on 150 videos (colour 100 %, shape 98 %, motion 97 %, direction 96 %, background 99 %) so that
    bfloat16 CPUs pass too; chance is 1 in 3 for shape and 1 in 11 for motion."""
    pipeline = vidsynth.load(SHIPPED_MODEL)
    summary = evaluate(pipeline, default_specs(16), seeds=2)
    assert summary["color_accuracy"] >= 0.9, summary
    assert summary["background_accuracy"] >= 0.9, summary
    assert summary["shape_accuracy"] >= 0.7, summary
    assert summary["motion_accuracy"] >= 0.8, summary
    assert summary["direction_accuracy"] >= 0.8, summary
