"""GenerationRequest: every setting of a generation, validated once, shared by the CLI, the Python API and HTTP.

Fields left as None take the model's native defaults (`ModelDefaults`) when the request is resolved against a
loaded model; the seed, when left out, is drawn then, so the resolved request says exactly what was made.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import RequestError

SCHEDULERS = ("ddim", "dpm++", "unipc", "euler")
MAX_FRAMES = 256
MAX_SIDE = 2048
MAX_STEPS = 500  # DDIM with steps_offset=1 would step past timestep 999 at 1000 steps
MAX_VIDEOS = 16
MAX_PROMPTS = 16
MAX_SEED = 2**63 - 1
MAX_FPS = 120
# A longer prompt is read in windows of 75 tokens (text.py); this bounds the windows, about 400 tokens of English.
MAX_PROMPT_CHARACTERS = 2000
# Video-to-video: the share of the steps run from the start video, noised to match. ZeroScope XL's makers
# recommend 0.66-0.85 for upscaling with it.
DEFAULT_STRENGTH = 0.75
# What diffusers' pipelines (and ModelScope's, for `text`) call these settings: an unknown setting by one of these
# names gets a pointer to vidsynth's.
OTHER_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_frames": "frames",
               "num_videos_per_prompt": "num_videos", "generator": "seed", "text": "prompt"}


@dataclass(frozen=True)
class Preset:
    """Speed against fidelity, relative to the model's native settings; explicit settings override it."""

    scheduler: str
    step_fraction: float  # of the model's default steps
    cache_interval: int  # full UNet runs every this many steps, deep features reused between (1 = off)
    guidance_fraction: float  # at most this first share of the steps guided (the model's own share if smaller)


PRESETS = {
    "quality": Preset("ddim", 1.0, 1, 1.0),  # the model's own sampling, exactly (ModelScope's DDIM)
    "balanced": Preset("dpm++", 0.5, 1, 1.0),
    "fast": Preset("dpm++", 0.4, 3, 0.5),
}
# Where a preset stops cutting, for models whose native steps are already few. On the shipped model (6 steps) 2
# DPM-Solver++ steps drew 72-80 % of the colours and 48-58 % of the shapes right, 3 steps 100 % and 82 % as its
# default does; deep features reused every 3rd step drew 48 % of the colours at 3 steps, 75 % at 6 and 100 % at 12
# (BENCHMARKS.md, "Presets"). Settings given explicitly are taken as they are.
MIN_PRESET_STEPS = 3
MIN_STEPS_FOR_FEATURE_REUSE = 10


@dataclass(frozen=True)
class ModelDefaults:
    """A model's native settings: what it was trained for."""

    frames: int = 16
    height: int = 256
    width: int = 256
    steps: int = 50
    guidance: float = 9.0
    fps: int = 8
    guidance_fraction: float = 1.0  # classifier-free guidance on this first share of the steps, conditional-only after

    def as_dict(self) -> dict:
        return asdict(self)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Declared before the prompt, so that the prompt's own validator can read it.
    allow_empty_prompt: bool = Field(False, description="Allow an empty prompt (unconditional generation).")
    prompt: Union[str, list[str]] = Field(description="Text prompt, or a list of prompts (one batch of videos each).")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARACTERS,
                                 description="What to steer away from; empty as in ModelScope's own pipeline.")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Video i of the request uses seed + i. Default: "
                                "drawn at random, and recorded with the video.")
    frames: Optional[int] = Field(None, ge=1, le=MAX_FRAMES, description="Frames per video. Default: the model's "
                                  "own (a start video's length).")
    height: Optional[int] = Field(None, ge=8, le=MAX_SIDE, description="Pixels; a multiple of 8. Default: the "
                                  "model's own.")
    width: Optional[int] = Field(None, ge=8, le=MAX_SIDE, description="Pixels; a multiple of 8. Default: the "
                                 "model's own.")
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="Denoising steps. Default: the model's own, "
                                 "fewer with the balanced and fast presets.")
    guidance: Optional[float] = Field(None, ge=0.0, le=100.0, allow_inf_nan=False, description="Classifier-free "
                                      "guidance scale: how closely to follow the prompt (1 = unguided, one UNet pass "
                                      "a step). Default: the model's own.")
    scheduler: Optional[Literal[SCHEDULERS]] = Field(None, description="Sampler; default: the preset's (ddim).")
    preset: Literal[tuple(PRESETS)] = Field("quality", description="quality (the model's own sampling), balanced "
                                            "(DPM-Solver++, half the steps) or fast (also deep-feature reuse and "
                                            "partial guidance).")
    cache_interval: Optional[int] = Field(None, ge=1, le=10, description="Run the full UNet every N steps, reusing "
                                          "deep features between (DeepCache); 1 = off. Default: the preset's.")
    guidance_fraction: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="Guide only the "
                                               "first share of the steps (1 = all). Default: the model's own share "
                                               "(1 for most models), at most the preset's.")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM stochasticity (0 = deterministic).")
    fps: Optional[int] = Field(None, ge=1, le=MAX_FPS, description="Frames per second of the video file. Default: "
                               "the model's own (a start video's).")
    num_videos: int = Field(1, ge=1, le=MAX_VIDEOS, description="Videos per prompt.")
    init_video: Optional[str] = Field(None, min_length=1, max_length=4096, description="Video-to-video: start from "
                                      "this video (a file in any format vidsynth writes or PyAV reads, or a PNG "
                                      "folder; over HTTP, the id of an upload or of a completed job, 'ID/INDEX' for "
                                      "another of its videos), or from a still image, which starts every frame. "
                                      "Resized to height x width; frames and fps default to the video's.")
    strength: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="With a start video "
                                      "(init_video): how far to move from it, the share of the steps run (1 = all, "
                                      f"from pure noise). Default {DEFAULT_STRENGTH}.")

    @field_validator("prompt")
    @classmethod
    def _prompt_given(cls, prompt, info: ValidationInfo):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"give between 1 and {MAX_PROMPTS} prompts")
        if not info.data.get("allow_empty_prompt") and any(not p.strip() for p in prompts):
            raise ValueError("prompt is empty; write a prompt, or set allow_empty_prompt for unconditional generation")
        if any(len(p) > MAX_PROMPT_CHARACTERS for p in prompts):
            raise ValueError(f"should have at most {MAX_PROMPT_CHARACTERS} characters")
        return prompt

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, side):
        if side is not None and side % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got {side}")
        return side

    @field_validator("init_video", mode="before")
    @classmethod
    def _a_path(cls, init_video):
        if isinstance(init_video, os.PathLike):
            return os.fspath(init_video)
        if init_video is not None and not isinstance(init_video, str):
            hint = (": save it first, video.save('start.mp4'), so that the settings recorded with the new video can "
                    "name it") if hasattr(init_video, "save") else ""
            raise ValueError(f"must name a video (a file's path; over HTTP, a job's id), got "
                             f"{type(init_video).__name__}{hint}")
        return init_video

    @field_validator("strength")
    @classmethod
    def _strength_needs_a_video(cls, strength, info: ValidationInfo):
        # init_video is missing from `info.data` when its own validation failed: that error is the one to report.
        if strength is not None and "init_video" in info.data and info.data["init_video"] is None:
            raise ValueError("applies only to video-to-video, with init_video")
        return strength

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def total_videos(self) -> int:
        return len(self.prompts) * self.num_videos

    @property
    def denoising_steps(self) -> int:
        """The steps a resolved request runs: all of them, or from a start video the last strength x steps of the
        schedule (the margin keeps 0.29 x 100 at 29 steps where floating point makes it 28.999...)."""
        if self.init_video is None:
            return self.steps
        return min(self.steps, math.floor(self.steps * self.strength + 1e-6))

    def resolve(self, defaults: ModelDefaults) -> "GenerationRequest":
        """Fill every unset field from the preset and the model's defaults, and draw a seed if none was given."""
        preset = PRESETS[self.preset]
        preset_steps = min(defaults.steps, max(MIN_PRESET_STEPS, round(defaults.steps * preset.step_fraction)))
        steps = preset_steps if self.steps is None else self.steps
        native = {**defaults.as_dict(), "steps": preset_steps, "scheduler": preset.scheduler,
                  "cache_interval": preset.cache_interval if steps >= MIN_STEPS_FOR_FEATURE_REUSE else 1,
                  "guidance_fraction": min(preset.guidance_fraction, defaults.guidance_fraction)}
        filled = {name: native[name] for name in ("frames", "height", "width", "steps", "guidance", "fps", "scheduler",
                                                  "cache_interval", "guidance_fraction") if getattr(self, name) is None}
        if self.seed is None:
            filled["seed"] = secrets.randbelow(2**32)
        if self.init_video is not None and self.strength is None:
            filled["strength"] = DEFAULT_STRENGTH
        return self.model_copy(update=filled)

    @classmethod
    def create(cls, **fields) -> "GenerationRequest":
        """Validate fields into a request; raise RequestError naming the first bad field."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise request_error_from(exc) from None


def checked_defaults(values: dict) -> ModelDefaults:
    """A model's saved native settings, held to the rules a request's own settings are held to (they become one)."""
    defaults = ModelDefaults(**values)
    GenerationRequest.create(prompt="", allow_empty_prompt=True, **defaults.as_dict())
    return defaults


def field_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors as [{field, message}], naming the top-level setting (not the union member, the list index,
    or the part of an HTTP request it came in)."""
    found = []
    for error in errors:
        location = [str(part) for part in error["loc"] if part not in ("body", "query", "header", "path")]
        field = location[0] if location else "body"
        if error["type"] == "extra_forbidden":
            message = "unknown setting" + (f"; vidsynth calls it {OTHER_NAMES[field]!r}" if field in OTHER_NAMES else "")
        else:
            message = error["msg"].removeprefix("Value error, ")
        found.append({"field": field, "message": message})
    return found


def request_error_from(exc: ValidationError) -> RequestError:
    first = field_errors(exc.errors())[0]
    return RequestError(first["field"], first["message"])
