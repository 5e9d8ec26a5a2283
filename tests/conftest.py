"""Tiny random-weight models of the ModelScope architecture, built in the tests themselves (seconds on a CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from vidsynth.modelscope_format import openclip_tokenizer
from vidsynth.schedulers import MODELSCOPE_SCHEDULE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
            parameter.copy_(offset + 0.05 * torch.randn(parameter.shape, generator=generator))
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
