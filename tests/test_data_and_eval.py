"""The procedural dataset, and the vision check of `vidsynth eval` against clips whose truth is known."""

import json

import numpy as np
import pytest

from vidsynth.data import (ClipSpec, ProceduralClips, VideoFolder, all_specs, evaluation_specs, render,
                           training_specs)
from vidsynth.errors import VidsynthError
from vidsynth.evaluate import Sample, analyse, default_specs, format_table, summarise
from vidsynth.video import write_video


def test_held_out_captions_are_never_trained_on():
    training, held_out = {s.caption for s in training_specs()}, {s.caption for s in evaluation_specs()}
    assert not training & held_out
    assert len(held_out) >= 50 and training | held_out == {s.caption for s in all_specs()}
    clips = ProceduralClips(frames=4, size=32, seed=1)
    assert all(clips.sample()[1] in training for _ in range(200))


def test_dataset_is_deterministic_by_seed():
    first, second = ProceduralClips(16, 64, seed=3), ProceduralClips(16, 64, seed=3)
    for _ in range(3):
        (a, caption_a), (b, caption_b) = first.sample(), second.sample()
        assert caption_a == caption_b and np.array_equal(a, b)


def test_captions_read_as_plain_english():
    assert ClipSpec("red", "circle", "left", "black").caption == "a red circle moving left on a black background"
    assert ClipSpec("blue", "square", "still", "white").caption == "a blue square standing still on a white background"
    assert ClipSpec("green", "triangle", "growing", "gray").caption == "a green triangle growing on a gray background"


@pytest.mark.parametrize("size", [64, 128])
def test_the_vision_check_reads_rendered_truth(size):
    """On clean renders of every held-out caption, the analysis recovers what was drawn."""
    rng = np.random.default_rng(0)
    specs = evaluation_specs()
    wrong = []
    for spec in specs:
        found = analyse(render(spec, 16, size, rng))
        for key in ("color", "shape", "motion", "background"):
            if getattr(found, key) != getattr(spec, key):
                wrong.append((spec.caption, key, getattr(found, key)))
    assert len(wrong) <= len(specs) * 4 * 0.02, wrong  # at most 2 % of the judgements wrong


def test_the_vision_check_sees_nothing_in_noise():
    noise = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    found = analyse(noise)
    assert found.flicker > 50


def test_default_specs_spread_over_the_held_out_set():
    assert len(default_specs(50)) == 50 and len({s.caption for s in default_specs(50)}) == 50


def test_video_folder_needs_captions_and_readable_videos(tmp_path):
    with pytest.raises(VidsynthError, match="does not exist"):
        VideoFolder(tmp_path / "none", 4, 32)
    with pytest.raises(VidsynthError, match="holds no videos"):
        VideoFolder(tmp_path, 4, 32)
    clip = render(ClipSpec("red", "circle", "left", "black"), 6, 48, np.random.default_rng(0))
    write_video(tmp_path / "a.mp4", clip, 8, {}, sidecar=False)
    with pytest.raises(VidsynthError, match="1 videos have no caption file.*a.mp4"):
        VideoFolder(tmp_path, 4, 32)
    (tmp_path / "a.txt").write_text("a red circle moving left on a black background\n")
    (tmp_path / "b.mp4").write_bytes(b"not a video")
    (tmp_path / "b.txt").write_text("broken")
    with pytest.raises(VidsynthError, match="cannot read video b.mp4"):
        VideoFolder(tmp_path, 4, 32)
    (tmp_path / "b.mp4").unlink()
    frames, caption = VideoFolder(tmp_path, 4, 32).sample()
    assert frames.shape == (4, 32, 32, 3) and caption.startswith("a red circle")


def test_eval_prints_its_table_and_writes_its_json(tmp_path, capsys):
    from vidsynth.cli import main
    assert main(["eval", "--prompts", "1", "--seeds", "2", "--seed", "5", "--guidance-fraction", "1",
                 "--json", str(tmp_path / "scores.json")]) == 0
    printed = capsys.readouterr().out
    assert "| colour |" in printed and ("Errors (asked -> drawn): " in printed or "No errors." in printed)
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["samples"] == 2 and [r["seed"] for r in summary["results"]] == [5, 6]
    assert summary["sampling"]["model"] == "vidsynth-tiny" and summary["sampling"]["guidance_fraction"] == 1.0
    assert 0 <= summary["color_accuracy"] <= 1
    assert [path.name for path in tmp_path.iterdir()] == ["scores.json"]  # written whole, nothing beside it


def test_eval_names_what_was_drawn_instead_of_what_was_asked():
    def sample(shape, found_shape, motion="left", found_motion="left"):
        expected = {"color": "red", "shape": shape, "motion": motion, "background": "black"}
        return Sample("a caption", 0, expected, {**expected, "shape": found_shape, "motion": found_motion,
                                                  "flicker": 1.0})

    summary = summarise([sample("square", "circle"), sample("square", "circle"), sample("circle", None),
                         sample("triangle", "triangle", "up", "up and to the left")], seconds=1.0)
    assert summary["shape_accuracy"] == 0.25 and summary["direction_accuracy"] == 0.75
    assert summary["errors"] == {"color": {}, "shape": {"square -> circle": 2, "circle -> nothing": 1},
                                 "motion": {"up -> up and to the left": 1}, "background": {}}
    assert format_table(summary).endswith("Errors (asked -> drawn): shape: square -> circle (2), circle -> nothing "
                                          "(1); motion: up -> up and to the left (1)")
    assert format_table(summarise([sample("square", "square")], seconds=1.0)).endswith("No errors.")
