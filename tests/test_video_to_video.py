"""Video-to-video (init_video, strength): against diffusers' VideoToVideoSDPipeline, with the shipped model, from
the CLI, and every way the start video can be wrong."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import VideoToVideoSDPipeline

import vidsynth
from vidsynth import GenerationRequest, RequestError, Video
from vidsynth.cli import main
from vidsynth.schedulers import make_scheduler
from vidsynth.video import read_frames

from test_cli import vidsynth as run_vidsynth

START = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def start_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("start") / "start.npy"
    np.save(path, START)
    return path


@pytest.mark.parametrize("scheduler, strength", [("ddim", 0.6), ("dpm++", 0.5), ("euler", 0.75), ("unipc", 0.3)])
def test_same_frames_as_diffusers_video_to_video(scheduler, strength, tiny_model_dir, tiny_pipeline, start_file):
    settings = dict(negative_prompt="blurry", steps=10, guidance=9.0, seed=3, scheduler=scheduler)
    video = tiny_pipeline("a red circle", init_video=str(start_file), strength=strength, progress=False, **settings)

    # diffusers samples the VAE's posterior where vidsynth takes its mode (Pipeline.encode_video says why), so it is
    # given vidsynth's latents of the start video; it draws the noise and runs the rest of the way itself.
    request = tiny_pipeline.prepare(GenerationRequest(prompt="x", init_video=str(start_file)))
    latents = tiny_pipeline.encode_video(START, request, lambda k, n: None)
    reference = VideoToVideoSDPipeline.from_pretrained(tiny_model_dir)
    reference.scheduler = make_scheduler(scheduler, tiny_pipeline.components.schedule)
    expected = reference("a red circle", video=latents.permute(0, 2, 1, 3, 4), strength=strength,
                         num_inference_steps=10, guidance_scale=9.0, negative_prompt="blurry",
                         generator=torch.Generator("cpu").manual_seed(3), output_type="np").frames[0]

    assert video.frames.shape == (4, 32, 32, 3)
    assert np.abs(video.frames / 255 - expected).max() <= 1 / 255
    assert video.settings["init_video"] == str(start_file) and video.settings["strength"] == strength


def test_the_start_video_is_encoded_as_the_vae_encodes_it(tiny_pipeline, start_file):
    request = tiny_pipeline.prepare(GenerationRequest(prompt="x", init_video=str(start_file)))
    latents = tiny_pipeline.encode_video(START, request, lambda k, n: None)
    vae = tiny_pipeline.components.vae
    with torch.inference_mode():
        pixels = torch.from_numpy(START).permute(0, 3, 1, 2).float() / 127.5 - 1
        expected = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    assert latents.shape == (1, 4, 4, 16, 16)
    torch.testing.assert_close(latents[0].permute(1, 0, 2, 3), expected, rtol=1e-4, atol=1e-4)


def _track(frames: np.ndarray) -> np.ndarray:
    """Where the shape is in each frame: the centroid of the pixels far from the background colour."""
    background = np.median(frames.reshape(-1, 3), axis=0)
    centres = []
    for frame in frames:
        ys, xs = np.nonzero(np.abs(frame.astype(int) - background).sum(-1) > 90)
        centres.append((xs.mean(), ys.mean()))
    return np.array(centres)


def _blueness(frames: np.ndarray) -> float:
    return float((frames[..., 2].astype(int) - frames[..., 0]).mean())


def test_the_shipped_model_keeps_the_motion_and_takes_the_new_prompt(shipped_pipeline, tmp_path):
    source = shipped_pipeline("a red circle moving right on a white background", seed=1, progress=False)
    path = source.save(tmp_path / "red.mp4")
    prompt = "a blue circle moving down on a white background"
    restyled = shipped_pipeline(prompt, init_video=str(path), strength=0.5, seed=2, progress=False)
    fresh = shipped_pipeline(prompt, seed=2, progress=False)

    start = _track(source.frames)
    assert start[-1, 0] - start[0, 0] > 15  # the red circle does move right
    restyled_distance = np.linalg.norm(_track(restyled.frames) - start, axis=1).mean()
    fresh_distance = np.linalg.norm(_track(fresh.frames) - start, axis=1).mean()
    assert restyled_distance < 3 and fresh_distance > 8, (restyled_distance, fresh_distance)
    assert _blueness(source.frames) < 0 < _blueness(restyled.frames)

    # A little strength changes little; all of it starts from noise, as text-to-video does.
    light = shipped_pipeline(prompt, init_video=str(path), strength=0.2, seed=2, progress=False)
    assert np.abs(light.frames.astype(int) - source.frames).mean() < 12
    assert _blueness(light.frames) < 0


def test_a_still_image_starts_every_frame_and_the_prompt_sets_the_motion(shipped_pipeline, tmp_path):
    image = np.full((64, 64, 3), 255, np.uint8)
    image[24:40, 8:24] = (220, 30, 30)  # a red square left of the centre, its centre at (15.5, 31.5)
    Image.fromarray(image).save(tmp_path / "square.png")
    motion = {}
    for direction in ("right", "down"):
        video = shipped_pipeline(f"a red square moving {direction} on a white background",
                                 init_video=str(tmp_path / "square.png"), strength=0.9, seed=1, progress=False)
        assert video.frames.shape == (16, 64, 64, 3) and video.fps == 8  # the model's length and rate
        track = _track(video.frames)
        assert np.linalg.norm(track[8] - (15.5, 31.5)) < 4  # passes where the image has it
        motion[direction] = track[-1] - track[0]
    (right_x, right_y), (down_x, down_y) = motion["right"], motion["down"]
    assert right_x > 8 and right_x > abs(right_y) and down_y > 8 and down_y > abs(down_x), motion


def test_frames_and_rate_come_from_the_start_video_and_its_frames_are_resized(shipped_pipeline, tmp_path):
    frames = np.zeros((5, 40, 48, 3), np.uint8)
    frames[:, :, 24:] = 255
    path = Video(frames, fps=12).save(tmp_path / "start.mp4")
    events = []
    video = shipped_pipeline("a red circle", init_video=str(path), seed=0, progress=False, callback=events.append)
    assert video.frames.shape == (5, 64, 64, 3) and video.fps == 12
    assert video.settings["strength"] == 0.75 and video.settings["steps"] == 6
    denoising = [e for e in events if e.phase == "denoise"]
    assert [e.step for e in denoising] == [1, 2, 3, 4] and denoising[0].total == 4  # the last 0.75 x 6 steps
    assert [(e.step, e.total) for e in events if e.phase == "encode"] == [(0, 1), (1, 1)]  # the text
    assert [(e.step, e.total) for e in events if e.phase == "encode_video"] == [(1, 1)]  # one chunk of 5 frames
    progress = [e.progress for e in events]
    assert progress == sorted(progress)

    shorter = shipped_pipeline("a red circle", init_video=str(path), frames=3, fps=6, seed=0, progress=False)
    assert shorter.frames.shape == (3, 64, 64, 3) and shorter.fps == 6

    np.save(tmp_path / "start.npy", frames)  # no frame rate: the model's
    assert shipped_pipeline("a red circle", init_video=str(tmp_path / "start.npy"), progress=False).fps == 8


@pytest.mark.parametrize("make, field, message", [
    (lambda d: d / "missing.mp4", "init_video", "does not exist"),
    (lambda d: (d / "notes.mp4").write_text("hello") and d / "notes.mp4", "init_video", "is not a readable video"),
    (lambda d: np.save(d / "flat.npy", np.zeros((4, 8, 8), np.uint8)) or d / "flat.npy", "init_video",
     "must hold uint8 frames x height x width x 3"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "init_video", "holds no frames (no .png files)"),
])
def test_an_unreadable_start_video_is_named(make, field, message, shipped_pipeline, tmp_path):
    with pytest.raises(RequestError) as error:
        shipped_pipeline("x", init_video=str(make(tmp_path)), progress=False)
    assert error.value.field == field and message in error.value.message


def test_settings_that_do_not_fit_the_start_video_are_named(shipped_pipeline, start_file):
    with pytest.raises(RequestError) as error:
        shipped_pipeline("x", init_video=str(start_file), frames=5, progress=False)
    assert (error.value.field, error.value.message) == ("frames", "the video to start from has only 4")
    with pytest.raises(RequestError) as error:
        shipped_pipeline("x", init_video=str(start_file), strength=0.1, steps=6, progress=False)
    assert error.value.field == "strength" and "less than one step" in error.value.message
    with pytest.raises(RequestError) as error:
        GenerationRequest.create(prompt="x", strength=0.5)
    assert error.value.field == "strength" and "init_video" in error.value.message
    with pytest.raises(RequestError) as error:
        GenerationRequest.create(prompt="x", init_video="a.mp4", strength=0)
    assert error.value.field == "strength"
    with pytest.raises(RequestError) as error:
        shipped_pipeline("x", init_video=Video(START), progress=False)
    assert error.value.field == "init_video" and "save it first" in error.value.message
    assert GenerationRequest(prompt="x", init_video=start_file).init_video == str(start_file)  # a Path is taken


def test_long_start_videos_need_frames_set(tmp_path, shipped_pipeline):
    np.save(tmp_path / "long.npy", np.zeros((vidsynth.request.MAX_FRAMES + 1, 8, 8, 3), np.uint8))
    with pytest.raises(RequestError) as error:
        shipped_pipeline.prepare(GenerationRequest(prompt="x", init_video=str(tmp_path / "long.npy")))
    assert error.value.field == "init_video" and "set frames" in error.value.message
    request = shipped_pipeline.prepare(GenerationRequest(prompt="x", init_video=str(tmp_path / "long.npy"), frames=4))
    assert request.frames == 4


def test_cli_video_to_video_records_and_replays_it(tmp_path, monkeypatch):
    assert main(["generate", "a red circle moving right", "--seed", "1", "-o", str(tmp_path / "red.mp4")]) == 0
    made = run_vidsynth("generate", "a blue circle moving right", "--init-video", "red.mp4", "--strength", "0.5",
                        "--seed", "2", "-o", "blue.npy", "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    [result] = json.loads(made.stdout)
    assert result["settings"]["init_video"] == str(tmp_path / "red.mp4") and result["settings"]["strength"] == 0.5
    assert _blueness(np.load(tmp_path / "blue.npy")) > 0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the replay in this process; the run above was a real one
    assert main(["generate", "--from", str(tmp_path / "blue.json"), "-o", "again.npy"]) == 0
    assert np.array_equal(np.load(tmp_path / "blue.npy"), np.load(elsewhere / "again.npy"))


@pytest.mark.parametrize("args, message", [
    (["--init-video", "missing.mp4"], "missing.mp4 does not exist"),
    (["--strength", "0.5"], "--strength: applies only to video-to-video"),
    (["--init-video", "start.npy", "--strength", "1.5"], "--strength: Input should be less than or equal to 1"),
])
def test_cli_bad_start_video_settings_exit_2_before_loading(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "start.npy", START)
    monkeypatch.setattr("vidsynth.pipeline.load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "x", "-o", "out.mp4", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_read_frames_reads_every_format_vidsynth_writes(tmp_path):
    for name in ("clip.mp4", "clip.webm", "clip.gif", "clip.npy", "frames"):
        path = Video(START, fps=8).save(tmp_path / name)
        frames, rate = read_frames(path)
        assert frames.shape == START.shape and frames.dtype == np.uint8
        assert read_frames(path, limit=2)[0].shape == (2, *START.shape[1:])  # a long video is not read to its end
        if name in ("clip.npy", "frames"):
            assert np.array_equal(frames, START) and rate is None
        else:
            assert round(rate) == 8  # a GIF counts in hundredths of a second: 12 a frame


def test_the_progress_bar_shows_the_start_videos_encoding_then_the_steps(shipped_pipeline, start_file):
    from io import StringIO

    from vidsynth.progress import ProgressBar
    shown = StringIO()
    with ProgressBar(file=shown, leave=True, dynamic_ncols=False, ncols=100) as bar:
        shipped_pipeline.generate(GenerationRequest(prompt="a red circle", init_video=str(start_file), seed=0), bar)
    lines = shown.getvalue().replace("\r", "\n")
    assert "encoding the start video: 100%" in lines and "1/1 [" in lines
    assert "denoising: 100%" in lines and "4/4 [" in lines  # 0.75 of the shipped model's 6 steps
    assert lines.index("encoding the start video") < lines.index("denoising")
