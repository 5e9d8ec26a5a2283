"""The vidsynth command: real processes for the paths that matter (exit codes, signals), in-process for bad input."""

import argparse
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vidsynth import GenerationRequest, Video
from vidsynth.cli import build_parser, main, output_paths
from vidsynth.request import MAX_FRAMES, MAX_VIDEOS

SMALL = ["--frames", "3", "--height", "32", "--width", "32", "--steps", "2"]


def vidsynth(*args, cwd, timeout=300, umask=-1, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "vidsynth.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, umask=umask, preexec_fn=preexec_fn)


BAD_INPUT = [
    (["generate", ""], "PROMPT: prompt is empty"),
    (["generate", "   "], "PROMPT: prompt is empty"),
    (["generate", "x" * 2001], "PROMPT: should have at most 2000 characters"),
    (["generate", "x", "--negative", "y" * 2001], "--negative: String should have at most 2000 characters"),
    (["generate", "x", "--frames", "0"], "--frames: Input should be greater than or equal to 1"),
    (["generate", "x", "--frames", "999"], "--frames: Input should be less than or equal to 256"),
    (["generate", "x", "--height", "100"], "--height: must be a multiple of 8"),
    (["generate", "x", "--width", "4096"], "--width: Input should be less than or equal to 2048"),
    (["generate", "x", "--steps", "0"], "--steps: Input should be greater than or equal to 1"),
    (["generate", "x", "--guidance", "-2"], "--guidance: Input should be greater than or equal to 0"),
    (["generate", "x", "--guidance", "nan"], "--guidance: Input should be a finite number"),
    (["generate", "x", "--seed", "-5"], "--seed: Input should be greater than or equal to 0"),
    (["generate", "x", "-o", "clip.avi"], "unknown output extension '.avi'"),
    (["generate", "x", "-o", "missing/clip.mp4"], "output directory missing does not exist"),
    (["generate", "x", "-o", "/proc/1/clip.mp4"], "output directory /proc/1 is not writable"),
    (["generate", "x", "-o", "/proc/clip.mp4"], "cannot create files in output directory /proc: No such file or"),
    (["generate", "x", "--model", "./no-such-folder"], "model './no-such-folder' not found"),
    (["generate", "x", "--from", "nothing.mp4"], "nothing.mp4 does not exist"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_the_reason_and_writes_nothing(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_exits_1_saying_what_to_change_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch,
                                                                               capsys):
    from vidsynth.pipeline import Pipeline

    def denoise(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(Pipeline, "denoise", denoise)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), *SMALL, "--dtype", "float32",
                 "-o", "video.mp4"]) == 1
    assert "out of memory making the video (cpu, float32); try --forward-chunking" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_a_full_disk_exits_1_naming_what_could_not_be_written_and_leaves_nothing(command, tiny_model_dir, tmp_path):
    # Files may not grow past 4 KiB in the command's process, as on a full disk; it still reads the model.
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # noqa: E731
    if command == "generate":
        args, written = ["a red circle", "--model", tiny_model_dir, "--frames", "8", "--steps", "2", "-o", "clip.gif"], \
            "clip.gif"
    else:
        args, written = [tiny_model_dir, "converted"], "converted"
    done = vidsynth(command, *args, cwd=tmp_path, preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].endswith(f"vidsynth: error: could not write {written}: File too large")
    assert list(tmp_path.iterdir()) == []


def test_unknown_scheduler_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--scheduler", "plms"])
    assert exit_.value.code == 2
    assert "invalid choice: 'plms'" in capsys.readouterr().err


def test_generate_info_and_replay(tiny_model_dir, tmp_path, monkeypatch):
    made = vidsynth("generate", "a red circle", "moving left", "--model", tiny_model_dir, *SMALL, "--seed", "9",
                    "-o", "first.npy", "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    [result] = json.loads(made.stdout)
    assert result["settings"]["prompt"] == "a red circle moving left" and result["settings"]["seed"] == 9

    info = vidsynth("info", "first.json", "--json", cwd=tmp_path)
    assert json.loads(info.stdout)["settings"] == result["settings"]

    # The replays in this process: the real one above covered the command's process.
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from", "first.json", "-o", "again.npy"]) == 0
    assert np.array_equal(np.load(tmp_path / "first.npy"), np.load(tmp_path / "again.npy"))
    assert main(["generate", "--from", "first.json", "--seed", "10", "-o", "other.npy"]) == 0
    assert not np.array_equal(np.load(tmp_path / "first.npy"), np.load(tmp_path / "other.npy"))


def test_a_replay_in_another_precision_says_its_video_will_differ(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), *SMALL, "-o", "first.npy"]) == 0
    assert main(["generate", "--from", "first.json", "-o", "same.npy"]) == 0
    assert "note" not in capsys.readouterr().err
    made_in = json.loads((tmp_path / "first.json").read_text())["dtype"]  # float32, or bfloat16 on a CPU with it
    other = "bfloat16" if made_in == "float32" else "float32"
    assert main(["generate", "--from", "first.json", "--dtype", other, "-o", "other.npy"]) == 0
    assert (f"note: first.json was made in {made_in} and this runs in {other}: the video will be close to it, not "
            f"the same (--dtype {made_in} to match)") in capsys.readouterr().err


def test_help_gives_each_settings_meaning_default_and_range_from_the_request():
    """A generation option's help is its GenerationRequest field's description, default and bounds, written once."""
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    sampling = {"steps", "guidance", "guidance_fraction", "scheduler", "preset"}  # eval's own --seed means another
    for command, shared in (("generate", set(GenerationRequest.model_fields) - {"prompt"}), ("eval", sampling)):
        settings = [action for action in commands[command]._actions if action.dest in shared]
        assert len(settings) >= len(sampling)
        for action in settings:
            assert action.help and action.help.startswith(GenerationRequest.model_fields[action.dest].description)
    text = " ".join(commands["generate"].format_help().split())
    assert f"Frames per video. Default: the model's own (a start video's length). Takes 1 to {MAX_FRAMES}." in text
    assert f"Videos per prompt. Default: 1. Takes 1 to {MAX_VIDEOS}." in text
    assert "noise). Default 0.75. Takes more than 0, at most 1." in text  # --strength
    assert "DDIM stochasticity (0 = deterministic). Default: 0.0. Takes 0 to 1." in text
    assert "recorded with the video. Takes 0 or more." in text  # --seed


def test_commands_that_load_no_model_run_without_the_model_libraries(tmp_path):
    """--help, --version and `info` import neither torch nor diffusers nor transformers (seconds of importing),
    `models` and `download` not the latter two; `import vidsynth` builds and validates requests without them, and
    loads the pipeline when it is first asked for. A command that loads a model refuses bad arguments before
    importing the model libraries, so that a typo is answered at once."""
    Video(np.zeros((2, 8, 8, 3), np.uint8), 8, {"prompt": "p", "seed": 1}).save(tmp_path / "v.mp4")
    script = """if True:
        import contextlib, io, json, sys
        from vidsynth.cli import build_parser, main
        build_parser().format_help()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["info", sys.argv[1], "--json"]) == 0
        assert json.loads(out.getvalue())["settings"]["seed"] == 1
        import vidsynth
        vidsynth.GenerationRequest.create(prompt="a red circle", frames=2)
        light = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["models"]) == 0
        listing = sorted(m for m in ("diffusers", "transformers", "modelscope") if m in sys.modules)
        with contextlib.redirect_stderr(io.StringIO()) as refusals:
            assert main(["generate", "a red circle", "--frames", "0"]) == 2
            assert main(["generate", "a red circle", "-o", sys.argv[2]]) == 2
            assert main(["generate", "a red circle", "--init-video", sys.argv[2]]) == 2
            assert main(["eval", "--prompts", "0"]) == 2
            assert main(["generate", "a red circle", "--model", sys.argv[2]]) == 2
            assert main(["eval", "--model", "not-a-model"]) == 2
            assert main(["eval", "--json", sys.argv[2]]) == 2  # refused now, not after the evaluation
            assert main(["train", "--out", sys.argv[2], "--init", "not-a-model"]) == 2
            assert main(["eval", "--steps", "0"]) == 2
            assert main(["eval", "--guidance-fraction", "0"]) == 2
            assert main(["eval", "--seeds", "17"]) == 2
        assert refusals.getvalue().count("vidsynth: error:") == 11, refusals.getvalue()
        assert "error: --steps:" in refusals.getvalue() and "error: --guidance-fraction:" in refusals.getvalue()
        assert refusals.getvalue().count("no-such-folder does not exist") == 2
        assert refusals.getvalue().count("not found: no such folder, and not a known alias") == 3
        refused = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
        assert vidsynth.load.__module__ == "vidsynth.pipeline"
        print(json.dumps([light, listing, refused]))
    """
    no_modelscope_cache = {**os.environ, "MODELSCOPE_CACHE": str(tmp_path / "never-used")}  # nor its client, then
    missing = tmp_path / "no-such-folder" / "v.mp4"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "v.mp4"), str(missing)], capture_output=True,
                          text=True, timeout=120, env=no_modelscope_cache)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[], [], []]


def test_a_command_that_loads_a_model_says_so_before_importing_the_model_libraries(tmp_path):
    """Importing them takes seconds (the most of a first video's time): the person is told what is happening first."""
    script = """if True:
        import sys
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name in ("diffusers", "transformers"):
                    print(f"importing {name}", file=sys.stderr)
        sys.meta_path.insert(0, Watch())
        from vidsynth.cli import main
        assert main(["generate", "a red circle", "--frames", "1", "--steps", "1", "-o", sys.argv[1]]) == 0
    """
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "v.npy")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("loading the shipped model...\nimporting "), done.stderr[:200]
    assert np.load(tmp_path / "v.npy").shape == (1, 64, 64, 3)


def test_mp4_metadata_drives_info_and_default_names(tiny_model_dir, tmp_path):
    made = vidsynth("generate", "A car flying in space.", "--model", tiny_model_dir, *SMALL, "--seed", "3",
                    "--num-videos", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    names = sorted(p.name for p in tmp_path.glob("*.mp4"))
    assert names == ["a-car-flying-in-space-3.mp4", "a-car-flying-in-space-4.mp4"]
    (tmp_path / "a-car-flying-in-space-3.json").unlink()  # info must read the mp4's own metadata
    info = vidsynth("info", "a-car-flying-in-space-3.mp4", cwd=tmp_path)
    assert info.returncode == 0
    assert "seed               3" in info.stdout and "codec              h264" in info.stdout


@pytest.mark.parametrize("prompt, name", [("Ein Würfel, grün!", "ein-wurfel-grun-7.mp4"),
                                          ("一辆车在太空飞行", "video-7.mp4")])
def test_default_names_keep_accented_letters_as_plain_ones(prompt, name):
    video = Video(np.zeros((1, 8, 8, 3), np.uint8), settings={"prompt": prompt, "seed": 7})
    assert output_paths(None, [video]) == [Path(name)]


def test_ctrl_c_exits_130_and_leaves_no_file(tiny_model_dir, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "vidsynth.cli", "generate", "a red circle", "--model", str(tiny_model_dir),
         "--frames", "8", "--height", "64", "--width", "64", "--steps", "500", "-o", "clip.mp4"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        # A shell starts background jobs with SIGINT ignored, and children inherit that: undo it, as a terminal's
        # foreground process has it, or this test would wait on a process that never hears the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = []  # read all along, so the bar can never fill the pipe and block the process
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "step" not in "".join(stderr) and time.monotonic() < deadline:  # wait for the progress bar to start
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 60 s after Ctrl-C; its stderr: {''.join(stderr)[-2000:]}")
    reader.join(10)
    assert code == 130, "".join(stderr)
    assert "interrupted" in "".join(stderr)
    assert list(tmp_path.iterdir()) == []


def test_convert_modelscope_layout_gives_the_same_video(modelscope_reference, tmp_path):
    source = modelscope_reference["folder"]
    converted = vidsynth("convert", source, tmp_path / "converted", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "converted" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    settings = ["a red circle", "--frames", "2", "--height", "64", "--width", "64", "--steps", "2", "--seed", "1"]
    for name, model in (("original.npy", source), ("converted.npy", tmp_path / "converted")):
        assert main(["generate", *settings, "--model", str(model), "-o", str(tmp_path / name)]) == 0
    assert np.array_equal(np.load(tmp_path / "original.npy"), np.load(tmp_path / "converted.npy"))

    refused = vidsynth("convert", source, tmp_path / "converted", cwd=tmp_path)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_converted_model_folders_are_not_private_and_do_not_name_their_source(tiny_model_dir, tmp_path):
    converted = vidsynth("convert", tiny_model_dir, tmp_path / "converted", "--dtype", "float16", cwd=tmp_path,
                         umask=0o022)
    assert converted.returncode == 0, converted.stderr
    # Nothing but what vidsynth says: diffusers' logging, which warns of every cast of a model, stays off.
    assert converted.stderr == f"loading {tiny_model_dir}...\nwrote {tmp_path / 'converted'} (diffusers layout, float16)\n"
    assert stat.S_IMODE((tmp_path / "converted").stat().st_mode) == 0o755  # not private, as temporary folders are made
    for part in ("unet", "vae", "text_encoder"):
        assert str(tiny_model_dir) not in (tmp_path / "converted" / part / "config.json").read_text(), part


def test_models_lists_the_aliases(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["alias"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"vidsynth-tiny", "ms-1.7b", "zeroscope-576w", "zeroscope-xl"} <= set(rows)
    assert rows["zeroscope-576w"]["defaults"]["width"] == 576


@pytest.mark.parametrize("flags, chunking", [([], None), (["--forward-chunking"], True),
                                             (["--no-forward-chunking"], False)])
def test_forward_chunking_flags_reach_the_pipeline(flags, chunking, tiny_model_dir, tmp_path, monkeypatch):
    import vidsynth.pipeline
    made = []
    real_pipeline = vidsynth.pipeline.Pipeline
    monkeypatch.setattr(vidsynth.pipeline, "Pipeline", lambda *a, **options: made.append(options) or real_pipeline(
        *a, **options))
    assert main(["generate", "x", "--model", str(tiny_model_dir), "-o", str(tmp_path / "x.npy"), *SMALL, *flags]) == 0
    assert [options["forward_chunking"] for options in made] == [chunking]


def test_compile_says_the_first_step_compiles(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)
    assert main(["generate", "x", "--model", str(tiny_model_dir), "-o", str(tmp_path / "x.npy"), *SMALL,
                 "--compile"]) == 0
    assert "the first step compiles the UNet" in capsys.readouterr().err


# A fresh process running the CLI, whose torch.compile reports the folder inductor would write its kernels to and
# stops there.
COMPILE_REPORTING_CLI = """
import os, sys, torch
def reporting_compile(model, **options):
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    print("inductor cache:", cache_dir(), flush=True)
    os._exit(0)
torch.compile = reporting_compile
from vidsynth.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("chosen", [False, True])
def test_compile_keeps_its_kernels_in_the_users_cache_folder_unless_told(chosen, tiny_model_dir, tmp_path):
    environment = {name: value for name, value in os.environ.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
    environment["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    if chosen:
        environment["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "chosen")
    done = subprocess.run([sys.executable, "-c", COMPILE_REPORTING_CLI, "generate", "x", "--model",
                           str(tiny_model_dir), "-o", str(tmp_path / "x.npy"), *SMALL, "--compile"],
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = tmp_path / "chosen" if chosen else tmp_path / "cache" / "vidsynth" / "torch-compile"
    assert done.stdout == f"inductor cache: {expected}\n"



def test_the_readme_command_reference_names_every_option_and_no_other():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    reference = readme.split("## Command line", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    reference, runtime = reference.split("RUNTIME:")
    reference = reference.replace("[RUNTIME]", runtime)

    def options(text: str) -> set[str]:
        both_ways = re.findall(r"--\[no-\]([a-z-]+)", text)  # --[no-]x: --x and --no-x
        return set(re.findall(r"--[a-z][a-z-]*", text)) | {f"--{prefix}{name}" for name in both_ways
                                                           for prefix in ("", "no-")}

    def parsed(parser: argparse.ArgumentParser) -> set[str]:
        return {option for action in parser._actions for option in action.option_strings
                if option.startswith("--") and option != "--help"}

    documented = {command: options(text) for command, text in
                  re.findall(r"^vidsynth ([a-z]+)(.*?)(?=^vidsynth |\Z)", reference, re.MULTILINE | re.DOTALL)}
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    assert documented == {name: parsed(command) for name, command in commands.items()}
    assert set(re.findall(r"^vidsynth (--[a-z-]+)", reference, re.MULTILINE)) == parsed(parser)
