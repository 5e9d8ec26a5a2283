"""Model references that cannot be used get a clear ModelError; hub ids resolve through the standard cache."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MODEL_CFG, copy_with_links
from vidsynth import ModelError, ModelUnavailableError
from vidsynth.loading import load_components


def test_missing_path_and_wrong_kinds_of_path(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_components(str(tmp_path / "no-such-model"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_components(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a diffusers-layout .* nor a ModelScope-layout"):
        load_components(str(tmp_path / "empty"))


def test_a_path_object_names_a_folder(tiny_model_dir, tmp_path, monkeypatch):
    loaded = load_components(Path(tiny_model_dir))
    assert loaded.source == load_components(str(tiny_model_dir)).source == {"path": str(Path(tiny_model_dir)),
                                                                              "layout": "diffusers"}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="^model folder ms-1.7b not found$"):  # a path, not the alias of that name
        load_components(Path("ms-1.7b"))
    with pytest.raises(ModelError, match="^model folder acme/model not found$"):  # nor a hub id
        load_components(Path("acme/model"))


def broken_modelscope(modelscope_reference, tmp_path, name: str) -> Path:
    folder = copy_with_links(modelscope_reference["folder"], tmp_path / "model")
    (folder / name).unlink()
    return folder


def test_configuration_saved_as_an_html_page(modelscope_reference, tmp_path):
    folder = broken_modelscope(modelscope_reference, tmp_path, "configuration.json")
    (folder / "configuration.json").write_text("<!DOCTYPE html>\n<html><head><title>configuration.json</title>")
    with pytest.raises(ModelError, match="not valid JSON.*HTML page"):
        load_components(str(folder))


def test_configuration_of_another_kind_of_model(modelscope_reference, tmp_path):
    folder = broken_modelscope(modelscope_reference, tmp_path, "configuration.json")
    (folder / "configuration.json").write_text(json.dumps({"model": {"type": "image-captioning"}}))
    with pytest.raises(ModelError, match="no model.model_cfg"):
        load_components(str(folder))


def test_truncated_weight_file(modelscope_reference, tmp_path):
    folder = broken_modelscope(modelscope_reference, tmp_path, "text2video_pytorch_model.pth")
    data = (modelscope_reference["folder"] / "text2video_pytorch_model.pth").read_bytes()
    (folder / "text2video_pytorch_model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_components(str(folder))


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_unrun(modelscope_reference, tmp_path):
    folder = broken_modelscope(modelscope_reference, tmp_path, "VQGAN_autoencoder.pth")
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": RunsCode(marker)}, folder / "VQGAN_autoencoder.pth")
    with pytest.raises(ModelError, match="refusing to load .* run code"):
        load_components(str(folder))
    assert not marker.exists()


def test_shapes_that_do_not_match_the_configuration(modelscope_reference, tmp_path):
    folder = broken_modelscope(modelscope_reference, tmp_path, "configuration.json")
    config = json.loads((modelscope_reference["folder"] / "configuration.json").read_text())
    config["model"]["model_cfg"] = {**MODEL_CFG, "unet_dim": 64}
    (folder / "configuration.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="UNet checkpoint shapes do not match its configuration"):
        load_components(str(folder))


def test_corrupt_diffusers_weights(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load unet"):
        load_components(str(folder))


def test_diffusers_folder_of_another_pipeline(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="UNet2DConditionModel, not the UNet3DConditionModel"):
        load_components(str(folder))


@pytest.mark.parametrize("saved, problem", [
    ({"guidance_fraction": 2.0}, r"defaults\.guidance_fraction: .*less than or equal to 1"),
    ({"frames": 0}, r"defaults\.frames: .*greater than or equal to 1"),
    ({"width": 100}, r"defaults\.width: must be a multiple of 8"),
    ({"sampler": "ddim"}, r"not a valid vidsynth settings file: .*'sampler'"),
])
def test_settings_file_with_defaults_no_request_may_have(tiny_model_dir, tmp_path, saved, problem):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "vidsynth.json").write_text(json.dumps({"defaults": {"steps": 4, **saved}}))
    with pytest.raises(ModelError, match=problem):
        load_components(str(folder))
    (folder / "vidsynth.json").write_text(json.dumps({"defaults": {"steps": 4, "guidance_fraction": 0.5}}))
    defaults = load_components(str(folder)).defaults
    assert (defaults.steps, defaults.guidance_fraction) == (4, 0.5)


def test_known_alias_not_downloaded_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="damo-vilab/text-to-video-ms-1.7b is not in the Hugging Face cache"):
        load_components("ms-1.7b")
