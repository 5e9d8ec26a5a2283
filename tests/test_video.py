"""Video files: decoded back with PyAV and checked for what browsers and players need."""

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from vidsynth import OutputError, Video, Videos, read_frames, read_settings
from vidsynth.video import write_video

SETTINGS = {"prompt": "a test pattern", "seed": 42, "steps": 3, "fps": 8, "vidsynth_version": "test"}


def pattern(frames=12, height=48, width=64) -> np.ndarray:
    """Moving colour bars: every frame differs, and colours are strong enough to survive yuv420p."""
    x = np.arange(width)[None, None, :, None]
    t = np.arange(frames)[:, None, None, None]
    channels = np.array([0, 85, 170])[None, None, None, :]
    video = ((x * 4 + t * 10 + channels) % 256).astype(np.uint8)
    return np.broadcast_to(video, (frames, height, width, 3)).copy()


def test_mp4_plays_in_browsers_and_round_trips(tmp_path):
    path = Video(pattern(), fps=8, settings=SETTINGS).save(tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (64, 48)
        assert float(stream.average_rate) == 8
        assert json.loads(container.metadata["comment"]) == SETTINGS
    frames, fps = read_frames(path)
    assert frames.shape == (12, 48, 64, 3) and fps == 8
    assert np.abs(frames.astype(int) - pattern()).mean() < 12  # lossy, but the same picture
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart: playable while downloading
    assert read_settings(path) == SETTINGS
    assert json.loads((tmp_path / "clip.json").read_text()) == SETTINGS


def test_odd_sizes_are_padded_to_even(tmp_path):
    path = write_video(tmp_path / "odd.mp4", pattern(4, 33, 45), 8, {})
    frames, _ = read_frames(path)
    assert frames.shape == (4, 34, 46, 3)


def test_webm_is_vp9(tmp_path):
    path = Video(pattern(), fps=10, settings=SETTINGS).save(tmp_path / "clip.webm")
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
    frames, fps = read_frames(path)
    assert frames.shape == (12, 48, 64, 3) and fps == 10
    assert read_settings(path) == SETTINGS


def test_gif_npy_and_png_folder(tmp_path):
    video = Video(pattern(), fps=8, settings=SETTINGS)
    gif_frames, _ = read_frames(video.save(tmp_path / "clip.gif"))
    assert gif_frames.shape == (12, 48, 64, 3)
    (tmp_path / "clip.json").unlink()
    assert read_settings(tmp_path / "clip.gif") == SETTINGS  # carried in the GIF itself, as a GIF passed on is
    unicode = {**SETTINGS, "prompt": "ein grüner Kreis, 緑の円"}
    assert read_settings(write_video(tmp_path / "u.gif", pattern(2), 8, unicode, sidecar=False)) == unicode
    assert np.array_equal(np.load(video.save(tmp_path / "clip.npy")), pattern())  # exact
    folder = video.save(tmp_path / "frames")
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:04d}.png" for i in range(12)] + ["settings.json"]
    assert read_settings(folder) == SETTINGS


def test_gif_keeps_frames_of_up_to_256_colours_exactly_and_others_close(tmp_path):
    rng = np.random.default_rng(0)
    few = rng.integers(0, 256, (200, 3), dtype=np.uint8)[rng.integers(0, 200, (6, 40, 56))]
    assert np.array_equal(read_frames(Video(few).save(tmp_path / "few.gif"))[0], few)
    y, x = np.mgrid[0:128, 0:128]
    many = np.stack([np.stack([(x + 4 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + 8 * t) % 256], axis=-1)
                     for t in range(6)]).astype(np.uint8)  # 16,384 colours a frame
    decoded = read_frames(Video(many).save(tmp_path / "many.gif"))[0]
    assert np.abs(decoded.astype(int) - many).mean() < 8


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.gif", "clip.npy", "frames"])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, name):
    previous = os.umask(0o022)
    try:
        path = Video(pattern(2), settings=SETTINGS).save(tmp_path / name)
    finally:
        os.umask(previous)
    for written in [path, *path.iterdir()] if path.is_dir() else [path, path.with_suffix(".json")]:
        expected = 0o755 if written.is_dir() else 0o644  # not private to the owner, as temporary files are made
        assert stat.S_IMODE(written.stat().st_mode) == expected, written.name


def test_bad_output_paths_write_nothing(tmp_path):
    video = Video(pattern(2), settings=SETTINGS)
    with pytest.raises(OutputError, match="unknown output extension"):
        video.save(tmp_path / "clip.avi")
    with pytest.raises(OutputError, match="does not exist"):
        video.save(tmp_path / "missing" / "clip.mp4")
    with pytest.raises(OutputError, match="not writable"):
        video.save(unwritable_folder(tmp_path) / "clip.mp4")
    assert not list(tmp_path.glob("*.mp4"))


def unwritable_folder(tmp_path):
    """A folder this process cannot write to; root ignores permission bits, but not /proc's."""
    if os.geteuid() == 0:
        return Path("/proc/1")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


def test_failed_encode_leaves_no_file(tmp_path, monkeypatch):
    import vidsynth.video as video_module

    def broken(path, *args):
        with open(path, "wb") as handle:
            handle.write(b"half a video")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video_module, "_encode", broken)
    with pytest.raises(RuntimeError):
        Video(pattern(2), settings=SETTINGS).save(tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def write_under_a_file_size_limit(path: Path, frames: np.ndarray, settings: dict, limit: int) -> str:
    """Write a video in a process whose files may not grow past `limit` bytes, as a full disk stops them (the kernel
    refuses the write; Python ignores the signal that comes with it). Returns what the write raised, or ''."""
    np.save(path.parent.parent / "frames.npy", frames)
    script = ("import json, sys, numpy\n"
              "from vidsynth import WriteError\n"
              "from vidsynth.video import write_video\n"
              "frames = numpy.load(sys.argv[2])\n"
              "try:\n"
              "    write_video(sys.argv[1], frames, 8, json.loads(sys.argv[3]))\n"
              "except WriteError as exc:\n"
              "    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(path.parent.parent / "frames.npy"),
                           json.dumps(settings)], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.gif", "clip.npy", "frames"])
def test_a_write_the_system_refuses_names_the_file_and_leaves_nothing(name, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)  # no format makes it small
    raised = write_under_a_file_size_limit(folder / name, noise, SETTINGS, limit=4096)
    assert raised == f"WriteError could not write {folder / name}: File too large", raised  # the system's words
    assert list(folder.iterdir()) == []


def test_a_video_is_never_left_without_its_sidecar(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    settings = {**SETTINGS, "prompt": "a long prompt " * 1000}  # a sidecar larger than the video
    raised = write_under_a_file_size_limit(folder / "clip.npy", pattern(1, 8, 8), settings, limit=4096)
    assert raised == f"WriteError could not write {folder / 'clip.json'}: File too large"
    assert list(folder.iterdir()) == []

    raised = write_under_a_file_size_limit(folder / "clip.npy", pattern(1, 8, 8), SETTINGS, limit=4096)
    assert raised == ""  # the same video with a small sidecar fits: both are there
    assert sorted(path.name for path in folder.iterdir()) == ["clip.json", "clip.npy"]


def test_notebook_display_embeds_a_playable_mp4():
    import base64
    import io

    html = Video(pattern(4), settings=SETTINGS)._repr_html_()
    assert "<video" in html and "a test pattern" in html
    data = base64.b64decode(html.split("base64,")[1].split('"')[0])
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def test_a_notebook_shows_several_videos_side_by_side(tiny_pipeline):
    videos = tiny_pipeline(["a red circle", "a blue <square>"], num_videos=2, seed=1, frames=2, height=32, width=32,
                           steps=1, progress=False)
    html = videos._repr_html_()
    assert isinstance(videos, list) and len(videos) == 4 and html.count("<video") == 4
    assert html.count("a blue &lt;square&gt; (seed 4)") == 1  # each caption, escaped, with its own seed


def test_several_videos_save_to_numbered_files_or_none_at_all(tmp_path):
    videos = Videos(Video(pattern(3 + index), settings={**SETTINGS, "seed": index}) for index in range(3))
    paths = videos.save(tmp_path / "clip.mp4")
    assert paths == [tmp_path / f"clip-{index}.mp4" for index in (1, 2, 3)]
    for index, path in enumerate(paths):
        frames, _ = read_frames(path)
        assert len(frames) == 3 + index and read_settings(path)["seed"] == index
    assert Videos(videos[:1]).save(tmp_path / "one.gif") == [tmp_path / "one.gif"]

    (tmp_path / "taken-2").mkdir()
    (tmp_path / "taken-2" / "0000.png").write_bytes(b"")
    with pytest.raises(OutputError, match="taken-2 already exists"):
        videos.save(tmp_path / "taken")  # folders of PNGs: the second is taken, so the first is not written either
    assert not (tmp_path / "taken-1").exists()
