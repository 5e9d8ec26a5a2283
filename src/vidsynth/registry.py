"""Known models: short aliases, where their weights live, and their native settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .request import ModelDefaults, checked_defaults

SHIPPED_MODEL = "vidsynth-tiny"
DEFAULTS_FILE = "vidsynth.json"  # native settings (and training vocabulary) vidsynth writes beside the weights it saves


@dataclass(frozen=True)
class KnownModel:
    alias: str
    source: str  # "hf:<repo id>", "modelscope:<model id>" or "package:<folder under vidsynth/assets/models>"
    defaults: ModelDefaults
    description: str


def package_model_path(name: str) -> Path:
    return Path(__file__).resolve().parent / "assets" / "models" / name


def _packaged_defaults(name: str) -> ModelDefaults:
    # A packaged model's native settings are the vidsynth.json saved with its weights, kept in that one place.
    return checked_defaults(json.loads((package_model_path(name) / DEFAULTS_FILE).read_text())["defaults"])


KNOWN_MODELS = {
    model.alias: model for model in [
        KnownModel(SHIPPED_MODEL, f"package:{SHIPPED_MODEL}", _packaged_defaults(SHIPPED_MODEL),
                   "vidsynth's own small model, shipped in the package: coloured shapes moving on plain backgrounds"),
        KnownModel("ms-1.7b", "hf:damo-vilab/text-to-video-ms-1.7b", ModelDefaults(),
                   "ModelScope text-to-video 1.7B (diffusers port), 16 frames at 256x256"),
        KnownModel("ms-1.7b-modelscope", "modelscope:damo/text-to-video-synthesis", ModelDefaults(),
                   "the same model in its original ModelScope layout, from the ModelScope hub"),
        KnownModel("zeroscope-576w", "hf:cerspense/zeroscope_v2_576w",
                   ModelDefaults(frames=24, height=320, width=576, steps=40, guidance=9.0, fps=8),
                   "ZeroScope v2 576w: watermark-free fine-tune, 24 frames at 576x320"),
        KnownModel("zeroscope-xl", "hf:cerspense/zeroscope_v2_XL",
                   ModelDefaults(frames=24, height=576, width=1024, steps=40, guidance=9.0, fps=8),
                   "ZeroScope v2 XL: 1024x576, made to upscale zeroscope-576w videos (--init-video, strength 0.66-0.85)"),
    ]
}
HUB_IDS = {model.source.split(":", 1)[1]: model for model in KNOWN_MODELS.values() if not model.source.startswith("package:")}
