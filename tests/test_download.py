"""Fetching models from the Hugging Face hub (a loopback stand-in serving the hub's HTTP API): only the files a load
reads come down, in the precision asked for, into the standard cache, from which later runs start offline."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fake_hub import FakeHub
from vidsynth import ModelError, ModelUnavailableError
from vidsynth.loading import hub_files_to_fetch, load_components, locate

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIGS = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
           "text_encoder/config.json"}
GENERATE = ["generate", "a red circle", "--frames", "2", "--height", "32", "--width", "32", "--steps", "2",
            "--seed", "4", "--dtype", "float32"]  # the video `small_video` makes


@pytest.fixture(scope="module")
def repos(tiny_model_dir, tmp_path_factory):
    """Two repos of the tiny model: one with float32 and float16 safetensors, the ModelScope-layout files some repos
    carry beside them and a README; one with float32 .bin files only (as older repos have)."""
    root = tmp_path_factory.mktemp("hub")
    both = root / "both"
    shutil.copytree(tiny_model_dir, both)
    for part, stem in WEIGHTS.items():
        tensors = load_file(both / part / f"{stem}.safetensors")
        save_file({k: v.half() for k, v in tensors.items()}, both / part / f"{stem}.fp16.safetensors")
    (both / "original").mkdir()
    (both / "original" / "text2video_pytorch_model.pth").write_bytes(b"\0" * 4096)
    (both / "README.md").write_text("# tiny\n")
    bin_only = root / "bin-only"
    shutil.copytree(tiny_model_dir, bin_only)
    for part, stem in WEIGHTS.items():
        safetensors = bin_only / part / f"{stem}.safetensors"
        name = "pytorch_model.bin" if part == "text_encoder" else f"{stem}.bin"
        torch.save(load_file(safetensors), bin_only / part / name)
        safetensors.unlink()
    return {"acme/both": both, "acme/bin-only": bin_only}


def run_cli(args, cwd, hub=None, offline=False, home=None, file_size_limit=None):
    env = {**os.environ, "HF_HOME": str(home or cwd / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "MODELSCOPE_CACHE": str(cwd / "modelscope")}
    env.pop("HF_HUB_OFFLINE", None)
    if hub is not None:
        env["HF_ENDPOINT"] = env["MODELSCOPE_ENDPOINT"] = hub.url
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    def limit():  # files may not grow past it, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "-m", "vidsynth.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300, preexec_fn=limit if file_size_limit else None)


@pytest.fixture
def hub_here(monkeypatch):
    """In this process, point huggingface_hub at a cache under HF_HOME `home` and at `hub` (None: offline)."""
    from huggingface_hub import constants

    def point(home: Path, hub=None):
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub is None)
        if hub is not None:
            monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    return point


def small_video(pipeline) -> np.ndarray:
    return pipeline("a red circle", frames=2, height=32, width=32, steps=2, seed=4, progress=False).frames


def tokenizer_files(repo: Path) -> set[str]:
    return {f"tokenizer/{path.name}" for path in (repo / "tokenizer").iterdir()}


def cache_snapshot(model: Path, home: Path, repo_id: str) -> Path:
    """Put a model folder into HF_HOME `home`'s cache layout as `repo_id`'s main revision; returns its folder there."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_hub_ids_resolve_through_the_hugging_face_cache(tiny_model_dir, tmp_path):
    """A model in HF_HOME's cache layout loads by repo id with the hub offline; one not cached fails clearly."""
    cache_snapshot(tiny_model_dir, tmp_path / "hf", "acme/tiny-t2v")

    done = run_cli(["generate", "a red circle", "--model", "acme/tiny-t2v", "--frames", "2", "--height", "32",
                    "--width", "32", "--steps", "2", "--seed", "1", "-o", "out.npy"], tmp_path, offline=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.npy").is_file()

    missing = run_cli(["generate", "a red circle", "--model", "acme/not-cached", "-o", "x.mp4"], tmp_path, offline=True)
    assert missing.returncode == 1
    assert "acme/not-cached is not in the Hugging Face cache" in missing.stderr
    assert "hf download acme/not-cached" in missing.stderr and "model_index.json" in missing.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_models_tells_downloaded_partly_downloaded_and_absent_apart(tiny_model_dir, hub_here, tmp_path, capsys):
    from vidsynth.cli import main
    cache_snapshot(tiny_model_dir, tmp_path / "hf", "cerspense/zeroscope_v2_576w")
    partial = cache_snapshot(tiny_model_dir, tmp_path / "hf", "damo-vilab/text-to-video-ms-1.7b")
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    hub_here(tmp_path / "hf")

    assert main(["models", "--json"]) == 0
    rows = {row["alias"]: row for row in json.loads(capsys.readouterr().out)}
    assert (rows["ms-1.7b"]["local_path"], rows["ms-1.7b"]["missing"]) == (None, ["unet/"])
    assert rows["zeroscope-576w"]["local_path"].endswith("snapshots/" + "0" * 40)
    assert (rows["zeroscope-xl"]["local_path"], rows["zeroscope-xl"]["missing"]) == (None, [])
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "partly downloaded, missing unet/: `vidsynth download ms-1.7b` resumes" in listing
    assert "zeroscope-xl" in listing and "[not downloaded]" in listing


def test_download_fetches_one_precision_and_later_runs_start_offline(repos, tiny_pipeline, hub_here, tmp_path):
    import vidsynth
    with FakeHub(repos) as hub:
        done = run_cli(["download", "acme/both", "--dtype", "float32"], tmp_path, hub)
        assert done.returncode == 0, done.stderr
        folder = Path(done.stdout.strip())
        assert "100%" in done.stderr  # the hub client's progress bar, which the CLI otherwise hides
        assert folder.is_relative_to(tmp_path / "hf") and (folder / "unet" / "config.json").is_file()
        full = {f"{part}/{stem}.safetensors" for part, stem in WEIGHTS.items()}
        fetched = CONFIGS | tokenizer_files(repos["acme/both"]) | full
        assert hub.downloaded("acme/both") == fetched and len(hub.downloads) == len(fetched)

        # Already complete in the cache: asking for another precision fetches nothing more.
        hub_here(tmp_path / "hf", hub)
        assert locate("acme/both", half_precision=True).path == folder
        assert len(hub.downloads) == len(fetched)

        # Half precision on a fresh cache: the float16 files instead of the float32 ones.
        half = run_cli(["download", "acme/both", "--dtype", "float16"], tmp_path, hub, home=tmp_path / "hf16")
        assert half.returncode == 0, half.stderr
        fp16 = {f"{part}/{stem}.fp16.safetensors" for part, stem in WEIGHTS.items()}
        assert {entry.removeprefix("acme/both/") for entry in hub.downloads[len(fetched):]} == fetched - full | fp16

    # The hub is gone: both caches serve the model by its id.
    offline = run_cli([*GENERATE, "--model", "acme/both", "-o", "cached.npy"], tmp_path, offline=True)
    assert offline.returncode == 0, offline.stderr
    reference = small_video(tiny_pipeline)
    assert np.array_equal(np.load(tmp_path / "cached.npy"), reference)
    hub_here(tmp_path / "hf16")
    from_half = small_video(vidsynth.load("acme/both", device="cpu", dtype="float32"))
    difference = np.abs(from_half.astype(int) - reference).max()
    assert 0 < difference <= 8  # float16 weights run in float32: the same model up to their rounding


def test_a_repo_of_bin_files_downloads_and_loads_the_same(repos, tiny_pipeline, tmp_path):
    with FakeHub(repos) as hub:
        done = run_cli([*GENERATE, "--model", "acme/bin-only", "-o", "bin.npy"], tmp_path, hub)
        assert done.returncode == 0, done.stderr
        assert {"unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"} <= hub.downloaded("acme/bin-only")
    assert np.array_equal(np.load(tmp_path / "bin.npy"), small_video(tiny_pipeline))


def test_a_repo_in_modelscope_layout_fetches_the_weights_its_configuration_names(modelscope_reference, hub_here,
                                                                                 tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(modelscope_reference["folder"], repo)
    (repo / "samples").mkdir()
    (repo / "samples" / "car.mp4").write_bytes(b"\0" * 4096)
    with FakeHub({"acme/modelscope-layout": repo}) as hub:
        done = run_cli(["download", "acme/modelscope-layout"], tmp_path, hub)
        assert done.returncode == 0, done.stderr
        assert hub.downloaded("acme/modelscope-layout") == {"configuration.json", "text2video_pytorch_model.pth",
                                                            "VQGAN_autoencoder.pth", "open_clip_pytorch_model.bin"}
        folder = Path(done.stdout.strip())
    for name in hub.downloaded("acme/modelscope-layout"):
        assert (folder / name).read_bytes() == (repo / name).read_bytes(), name
    hub_here(tmp_path / "hf")
    assert load_components("acme/modelscope-layout").source == {"path": str(folder), "layout": "modelscope"}


def test_the_modelscope_hub_gives_the_configuration_and_the_weights_it_names(modelscope_reference, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(modelscope_reference["folder"], repo)
    (repo / "samples").mkdir()
    (repo / "samples" / "car.mp4").write_bytes(b"\0" * 4096)
    weights = ["text2video_pytorch_model.pth", "VQGAN_autoencoder.pth", "open_clip_pytorch_model.bin"]
    with FakeHub({"damo/text-to-video-synthesis": repo}) as hub:
        done = run_cli(["download", "ms-1.7b-modelscope"], tmp_path, hub)
        assert done.returncode == 0, done.stderr
        folder = Path(done.stdout.strip())
        assert folder.is_relative_to(tmp_path / "modelscope")
        assert hub.downloaded("damo/text-to-video-synthesis") == {"configuration.json", *weights}
        for name in ["configuration.json", *weights]:
            assert (folder / name).read_bytes() == (repo / name).read_bytes(), name

        # A download cut short: `models` names what is missing, and the next run fetches only that.
        (folder / "VQGAN_autoencoder.pth").unlink()
        listed = run_cli(["models", "--json"], tmp_path, hub)
        row = next(row for row in json.loads(listed.stdout) if row["alias"] == "ms-1.7b-modelscope")
        assert (row["local_path"], row["missing"]) == (None, ["VQGAN_autoencoder.pth"])
        before = len(hub.downloads)
        resumed = run_cli(["download", "ms-1.7b-modelscope"], tmp_path, hub)
        assert resumed.returncode == 0, resumed.stderr
        assert hub.downloads[before:] == ["damo/text-to-video-synthesis/VQGAN_autoencoder.pth"]
        assert (folder / "VQGAN_autoencoder.pth").read_bytes() == (repo / "VQGAN_autoencoder.pth").read_bytes()

        unknown = run_cli(["download", "modelscope:acme/nothing-here"], tmp_path, hub)
        assert unknown.returncode == 2 and "acme/nothing-here is not a model on the ModelScope hub" in unknown.stderr
    cached = run_cli(["download", "ms-1.7b-modelscope"], tmp_path, hub)  # the hub is gone: the cache answers
    assert cached.returncode == 0 and Path(cached.stdout.strip()) == folder, cached.stderr


def test_an_interrupted_download_is_named_offline_and_resumed_online(repos, hub_here, tmp_path):
    with FakeHub(repos) as hub:
        assert run_cli(["download", "acme/both", "--dtype", "float32"], tmp_path, hub).returncode == 0
        folder = next((tmp_path / "hf" / "hub" / "models--acme--both" / "snapshots").iterdir())
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        Path(os.path.realpath(weights)).unlink()  # the blob and its link, as if the download stopped before them
        weights.unlink()

        hub_here(tmp_path / "hf")
        with pytest.raises(ModelUnavailableError, match=r"acme/both is only partly \(missing: unet/\) in the Hugg"):
            load_components("acme/both")

        before = len(hub.downloads)
        resumed = run_cli(["download", "acme/both", "--dtype", "float32"], tmp_path, hub)
        assert resumed.returncode == 0, resumed.stderr
        assert hub.downloads[before:] == ["acme/both/unet/diffusion_pytorch_model.safetensors"]
    assert load_components("acme/both").unet is not None


def test_a_download_the_disk_refuses_says_so_and_resumes_once_there_is_room(repos, tmp_path):
    largest = max((repos["acme/both"] / part / f"{stem}.safetensors").stat().st_size for part, stem in WEIGHTS.items())
    with FakeHub(repos) as hub:
        refused = run_cli(["download", "acme/both", "--dtype", "float32"], tmp_path, hub, file_size_limit=largest - 1)
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.splitlines()[-1] == (
            f"vidsynth: error: could not store acme/both in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}): File "
            f"too large; make room there, or set HF_HOME to a folder on a disk with room, and run the command again: "
            f"the download resumes")
        before = len(hub.downloads)
        resumed = run_cli(["download", "acme/both", "--dtype", "float32"], tmp_path, hub)
        assert resumed.returncode == 0, resumed.stderr
        assert not CONFIGS & {entry.removeprefix("acme/both/") for entry in hub.downloads[before:]}  # kept from before
    assert load_components(resumed.stdout.strip()).unet is not None


def test_unknown_repos_and_repos_of_other_kinds_are_named(repos, hub_here, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    (not_a_model / "unet").mkdir(parents=True)
    (not_a_model / "unet" / "config.json").write_text("{}")
    with FakeHub({**repos, "acme/not-a-model": not_a_model}) as hub:
        hub_here(tmp_path / "hf", hub)
        with pytest.raises(ModelError, match="acme/nothing-here is not a model on the Hugging Face hub"):
            load_components("acme/nothing-here")
        with pytest.raises(ModelError, match="acme/not-a-model is neither a diffusers-layout model .* nor a "
                                             "ModelScope-layout one"):
            load_components("acme/not-a-model")
        assert hub.downloads == []
    hub_here(tmp_path / "hf", hub)  # stopped: nothing answers at its address any more
    with pytest.raises(ModelUnavailableError, match="acme/both could not be fetched from the Hugging Face hub .*"
                                                    "vidsynth download acme/both"):
        load_components("acme/both")


def test_the_files_fetched_from_a_repo_listing():
    listing = ["model_index.json", "README.md", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
               "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "original/configuration.json",
               "original/text2video_pytorch_model.pth"]
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        listing += [f"{part}/config.json", f"{part}/{stem}.bin", f"{part}/{stem}.fp16.bin",
                    f"{part}/{stem}.safetensors", f"{part}/{stem}.fp16.safetensors"]
    # A sharded text encoder: full precision in two shards (one missing from a second, broken set), fp16 in one.
    listing += ["text_encoder/config.json", "text_encoder/model.safetensors.index.json",
                "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
                "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model-00001-of-00002.bin"]
    common = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "text_encoder/model.safetensors.index.json"}
    full = set(hub_files_to_fetch("acme/x", listing, half_precision=False))
    assert full == common | {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                             "text_encoder/model-00001-of-00002.safetensors",
                             "text_encoder/model-00002-of-00002.safetensors"}
    half = set(hub_files_to_fetch("acme/x", listing, half_precision=True))
    assert half == common | {"unet/diffusion_pytorch_model.fp16.safetensors",
                             "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"}
    with pytest.raises(ModelError, match="acme/x has no weights for its vae"):
        hub_files_to_fetch("acme/x", [name for name in listing if not name.startswith("vae/diffusion")], False)
