"""Tiny random-weight models of the ModelScope architecture, built in the tests themselves (seconds on a CPU)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from vidsynth.modelscope_format import openclip_tokenizer
from vidsynth.schedulers import MODELSCOPE_SCHEDULE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What the libraries write under the user's home stays out of it: the ModelScope client's session file and cache,
# and torch.compile's kernels.
_WRITTEN = tempfile.mkdtemp(prefix="vidsynth-tests-")
atexit.register(shutil.rmtree, _WRITTEN, ignore_errors=True)
os.environ["MODELSCOPE_HOME"], os.environ["MODELSCOPE_CACHE"] = f"{_WRITTEN}/modelscope-home", f"{_WRITTEN}/modelscope"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{_WRITTEN}/torch-compile"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def tiny_unet(cross_attention_dim: int = 32) -> UNet3DConditionModel:
    return UNet3DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                         layers_per_block=1, sample_size=32)


def tiny_text_encoder(width: int = 32) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=max(1, width // 16),
                                        max_position_embeddings=77, hidden_act="gelu", projection_dim=width))


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, including the layers initialised to zero, so every path affects the output."""
    generator = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in module.modules()
                    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for parameter in module.parameters():
            offset = 1.0 if id(parameter) in norm_weights else 0.0
            torch.randn(parameter.shape, generator=generator, out=parameter.data).mul_(0.05).add_(offset)
    return module.eval()


def build_diffusers_pipeline(seed: int = 0) -> TextToVideoSDPipeline:
    torch.manual_seed(seed)
    return TextToVideoSDPipeline(
        vae=randomize(tiny_vae(), seed + 1), text_encoder=randomize(tiny_text_encoder(), seed + 2),
        tokenizer=openclip_tokenizer(), unet=randomize(tiny_unet(), seed + 3),
        scheduler=DDIMScheduler.from_config(MODELSCOPE_SCHEDULE),
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random model saved in diffusers layout, as `save_pretrained` writes it."""
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    build_diffusers_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    import vidsynth
    return vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# A ModelScope-layout checkpoint made with ModelScope's and open_clip's own classes (the references of the parity
# tests). The text tower is 1024 wide because ModelScope's decoder cross-attention is built for 1024-d context.
MODEL_CFG = {
    "unet_in_dim": 4, "unet_dim": 32, "unet_y_dim": 768, "unet_context_dim": 1024, "unet_out_dim": 4,
    "unet_dim_mult": [1, 2, 2], "unet_num_heads": 8, "unet_head_dim": 16, "unet_res_blocks": 2,
    "unet_attn_scales": [1, 0.5], "unet_dropout": 0.1, "temporal_attention": "True",
    "num_timesteps": 1000, "mean_type": "eps", "var_type": "fixed_small", "loss_type": "mse",
}
AE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
             "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture(scope="session")
def modelscope_reference(tmp_path_factory):
    """ModelScope's modules with random weights, and the same weights saved as a ModelScope-layout folder."""
    folder = tmp_path_factory.mktemp("modelscope-layout")
    from reference_code import modelscope_module, modelscope_unet, open_clip_transformer
    cfg = MODEL_CFG
    unet = randomize(modelscope_unet(cfg), 11)
    vae = randomize(modelscope_module("autoencoder").AutoencoderKL(AE_CONFIG, 4), 12)
    text = randomize(open_clip_transformer().TextTransformer(width=1024, heads=16, layers=2, output_dim=1024), 13)

    torch.save(unet.state_dict(), folder / "text2video_pytorch_model.pth")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
                "global_step": 1}, folder / "VQGAN_autoencoder.pth")
    clip_state = dict(text.state_dict())
    clip_state.update({"visual.conv1.weight": torch.zeros(8, 3, 14, 14), "logit_scale": torch.tensor(4.6)})
    torch.save(clip_state, folder / "open_clip_pytorch_model.bin")
    (folder / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "text-to-video-synthesis",
        "model": {"type": "latent-text-to-video-synthesis", "model_cfg": cfg, "model_args": {
            "ckpt_clip": "open_clip_pytorch_model.bin", "ckpt_unet": "text2video_pytorch_model.pth",
            "ckpt_autoencoder": "VQGAN_autoencoder.pth", "max_frames": 16, "tiny_gpu": 1}},
    }))
    return {"folder": folder, "unet": unet, "vae": vae, "text": text}


def copy_with_links(source: Path, destination: Path) -> Path:
    """A copy of a model folder whose files link to the original, so one file can be replaced cheaply."""
    destination.mkdir()
    for item in source.iterdir():
        (destination / item.name).symlink_to(item)
    return destination


@pytest.fixture(scope="session")
def shipped_pipeline():
    import vidsynth
    return vidsynth.load()


@dataclass
class HeldCompile:
    pipeline: object  # the shipped model with compile=True
    release: threading.Event  # compiling waits for this
    compiled_at: list  # time.time() of each compilation


@pytest.fixture
def held_compile(monkeypatch):
    """The shipped model loaded with compile=True, with torch.compile standing in for by a wrapper that "compiles" on
    the first call of each input shape, as `dynamic=False` does, by waiting until `release` is set; then runs the model
    as it is. This checks when the pipeline compiles, in a second rather than dynamo's tracing time."""
    import vidsynth
    held = HeldCompile(None, threading.Event(), [])

    def held_compile_of(model, **options):
        shapes_seen = set()

        def compiled(*args, **kwargs):
            shapes = tuple(tuple(value.shape) for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
            if shapes not in shapes_seen:
                held.release.wait(timeout=60)
                held.compiled_at.append(time.time())
                shapes_seen.add(shapes)
            return model(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", held_compile_of)
    held.pipeline = vidsynth.load(device="cpu", dtype="float32", compile=True)
    yield held
    held.release.set()


class LiveServer:
    """A vidsynth app served by uvicorn on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        import socket

        import uvicorn
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    def __enter__(self) -> "LiveServer":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def read_events(response, timeout: Optional[float] = None):
    """The server-sent events of a streaming httpx response, as dicts, until the stream ends. With a timeout, a
    stream still going after that many seconds fails the test at its next line (a keep-alive counts)."""
    name = None
    deadline = None if timeout is None else time.monotonic() + timeout
    for line in response.iter_lines():
        assert deadline is None or time.monotonic() < deadline, f"no end to the event stream in {timeout} s"
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            assert event["event"] == name
            yield event
