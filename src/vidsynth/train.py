"""Training a ModelScope-architecture model: from scratch (VAE, text encoder, then UNet) or by fine-tuning.

The models are the same diffusers classes the pipeline runs, in smaller sizes. A run folder holds one checkpoint,
`model/`: the EMA weights in diffusers layout (so `--model RUN/model` generates with it) plus `model/training/` with
what resuming needs. Checkpoints are written beside the old one and swapped in, so a failure keeps the previous one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from .data import ClipStream, ProceduralClips, VideoFolder, vocabulary
from .devices import resolve_device
from .errors import OutputError, UsageError, VidsynthError, WriteError
from .files import refused_write_reason
from .loading import Components, load_components, save_model_folder
from .modelscope_format import openclip_tokenizer
from .request import ModelDefaults
from .schedulers import MODELSCOPE_SCHEDULE, SCRATCH_SCHEDULE

CHECKPOINT = "model"
VAE_FRAMES_PER_STEP = 32  # the VAE is trained on single frames
TRAINING_STATE = "training"
STATE_FORMAT = 2  # 2: the contrastive text-encoder stage and its state
MIN_SNR_GAMMA = 5.0
CONTRASTIVE_LOGIT_SCALE = 10.0  # temperature 0.1
TEXT_BATCH_MINIMUM = 32  # a contrastive step needs many captions to tell apart


@dataclass(frozen=True)
class Architecture:
    """The sizes of a model trained from scratch. `vae_channels` has one entry per VAE level (f = 2**(levels-1));
    `attention_levels` are the UNet levels with cross- and temporal attention (ModelScope: all but the lowest)."""

    frames: int
    size: int
    unet_channels: tuple[int, ...]
    head_dim: int
    text_width: int
    text_layers: int
    vae_channels: tuple[int, ...]
    attention_levels: tuple[int, ...]
    unet_layers: int = 1

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return tuple("CrossAttnDownBlock3D" if level in self.attention_levels else "DownBlock3D"
                     for level in range(len(self.unet_channels)))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


ARCHITECTURES = {
    # the shipped model's recipe: 16 frames at 64x64, f = 4 so a shape spans 5-6 latent pixels (at f = 8 the
    # autoencoder loses colour and outline of shapes this small), ~2.9M UNet parameters. Attention only at 8x8 and
    # 4x4 latents, where colour, shape and motion are decided: at 16x16 it cost a quarter of each training step.
    # Head size 8: the UNet's first temporal transformer is 8 heads wide at full resolution whatever the channels.
    "tiny": Architecture(frames=16, size=64, unet_channels=(32, 64, 64), head_dim=8, text_width=64, text_layers=2,
                         vae_channels=(32, 64, 64), attention_levels=(1, 2)),
    # for tests: seconds per step
    "micro": Architecture(frames=4, size=32, unet_channels=(32, 32), head_dim=8, text_width=32, text_layers=1,
                          vae_channels=(32, 32), attention_levels=(0,)),
}


@dataclass
class TrainOptions:
    out: Path
    architecture: Optional[str] = None  # a key of ARCHITECTURES; default "tiny" from scratch, the model's own when fine-tuning
    init: Optional[str] = None  # fine-tune this model (any --model reference) instead of training from scratch
    data: str = "procedural"  # or a folder of videos with captions
    steps: int = 4000  # UNet steps
    vae_steps: int = 1500
    text_steps: Optional[int] = None  # contrastive text-encoder steps; default 1000 for a new encoder, none when fine-tuning
    new_text_encoder: bool = False  # fine-tuning: replace the model's text encoder by a fresh one of the same size
    batch_size: int = 8
    lr: float = 5e-4
    vae_lr: float = 1e-3
    text_lr: float = 1e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    pure_noise_fraction: float = 0.0  # share of UNet clips trained at the last, pure-noise step (`sample_timesteps`)
    checkpoint_every: int = 250
    max_minutes: Optional[float] = None
    workers: Optional[int] = None  # processes drawing clips; default: several on CUDA, none on the CPU
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 0
    resume: bool = True
    defaults: dict = field(default_factory=dict)  # sampling defaults stored with the model

    def __post_init__(self):
        at_least = {"steps": 0, "vae_steps": 0, "text_steps": 0, "workers": 0, "batch_size": 1, "checkpoint_every": 1}
        for name, minimum in at_least.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise UsageError(f"--{name.replace('_', '-')} must be {minimum} or more (got {value})")
        for name in ("lr", "vae_lr", "text_lr"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise UsageError(f"--max-minutes must not be negative (got {self.max_minutes})")
        if not 0 <= self.pure_noise_fraction <= 1:
            raise UsageError(f"--pure-noise-fraction must be between 0 and 1 (got {self.pure_noise_fraction})")
        if self.new_text_encoder and not self.init:
            raise UsageError("--new-text-encoder applies to fine-tuning (--init); from scratch every encoder is new")
        if self.new_text_encoder and self.text_steps == 0:
            raise UsageError("--new-text-encoder needs --text-steps above 0: an untrained encoder reads no words")


def sample_timesteps(count: int, total: int, pure_noise_fraction: float, device=None) -> torch.Tensor:
    """Uniform training timesteps, of which a share is moved to the last step, where the input is pure noise.

    Sampling starts there, and there only the caption can say where a shape is and which way it goes. A step earlier
    the input already gives the shape away (at t = 900 its latents still show at 5 % amplitude, over hundreds of
    values), so uniform steps leave the UNet almost nothing that rewards reading layout from the caption: the tiny
    UNet, trained on the pure-noise step alone, drew each direction word's layout after some 2,700 clips; 17,000
    clips at uniform steps had not taught it that.
    """
    t = torch.randint(0, total, (count,), device=device)
    return torch.where(torch.rand(count, device=device) < pure_noise_fraction, total - 1, t)


class CaptionMatcher(torch.nn.Module):
    """The text encoder's training partner: a small video encoder into the text encoder's own output space, where
    a clip and its caption's pooled encoding should point the same way (CLIP's objective). Discarded after training.

    No projection on the text side and a fixed temperature: the encodings themselves, which the UNet reads, must
    differ by every word a clip shows, not only after a learned projection magnifies small differences.
    """

    def __init__(self, text_width: int):
        super().__init__()
        conv = torch.nn.Conv3d
        # Coarse pooling keeps where the shape is in the first and second half of the clip: that is the motion.
        self.video = torch.nn.Sequential(
            conv(3, 32, 3, stride=(1, 2, 2), padding=1), torch.nn.SiLU(),
            conv(32, 64, 3, stride=2, padding=1), torch.nn.SiLU(),
            conv(64, 128, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool3d(2), torch.nn.Flatten(), torch.nn.Linear(128 * 8, text_width))

    def loss(self, video: torch.Tensor, pooled_text: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Symmetric cross-entropy over the batch's pairs; clips with the same caption all count as matches."""
        video_features = F.normalize(self.video(video.transpose(1, 2)).float(), dim=-1)  # frames after channels
        text_features = F.normalize(pooled_text.float(), dim=-1)
        logits = CONTRASTIVE_LOGIT_SCALE * text_features @ video_features.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=logits.device)
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def build_components(arch: Architecture) -> Components:
    down = arch.down_block_types
    unet = UNet3DConditionModel(
        sample_size=arch.size // arch.vae_factor, block_out_channels=arch.unet_channels, layers_per_block=arch.unet_layers,
        cross_attention_dim=arch.text_width, attention_head_dim=arch.head_dim, down_block_types=down,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)), norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=arch.vae_channels, down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels), latent_channels=4, layers_per_block=1,
        norm_num_groups=32, sample_size=arch.size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=arch.text_width, intermediate_size=4 * arch.text_width,
        num_hidden_layers=arch.text_layers, num_attention_heads=max(1, arch.text_width // 32),
        max_position_embeddings=77, hidden_act="gelu", projection_dim=arch.text_width, pad_token_id=0,
        bos_token_id=49406, eos_token_id=49407))
    # 8 DDIM steps: on v-prediction with trailing timesteps the shipped model's first version, trained from scratch
    # this way, scored the same at 8 steps as at 10 and lost some at 6 (BENCHMARKS.md).
    defaults = ModelDefaults(frames=arch.frames, height=arch.size, width=arch.size, steps=8, guidance=4.0, fps=8)
    return Components(tokenizer=openclip_tokenizer(), text_encoder=text_encoder, unet=unet, vae=vae, schedule=SCRATCH_SCHEDULE,
                      defaults=defaults, name="scratch", vocabulary=frozenset())


def architecture_of(components: Components) -> dict:
    """The architecture-defining config of a model, for comparing a resumed or fine-tuned model with a request."""
    unet, vae, text = components.unet.config, components.vae.config, components.text_encoder.config
    attention_levels = [level for level, block in enumerate(unet.down_block_types) if block.startswith("CrossAttn")]
    return {"unet_channels": list(unet.block_out_channels), "head_dim": unet.attention_head_dim,
            "unet_layers": unet.layers_per_block, "text_width": text.hidden_size, "text_layers": text.num_hidden_layers,
            "vae_channels": list(vae.block_out_channels), "attention_levels": attention_levels}


def _same_architecture(components: Components, arch: Architecture) -> bool:
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(arch).items() if k not in ("frames", "size")}
    return architecture_of(components) == wanted


def make_run_folder(path: Path) -> None:
    """Create the run folder before any training, so that a path that cannot hold it is refused now rather than at
    the first checkpoint, minutes or hours in."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file; give a folder for the run")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the run folder --out {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"the run folder --out {path} is not writable")


class Trainer:
    def __init__(self, options: TrainOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.autocast_dtype, self.scaler = self._precision(options.precision)
        self.run_dir = Path(options.out)
        self.checkpoint_dir = self.run_dir / CHECKPOINT
        self.progress = {"vae_step": 0, "text_step": 0, "step": 0, "seconds": 0.0}
        torch.manual_seed(options.seed)
        self.components, self.arch = self._initial_components()
        self.fine_tuning = options.init is not None
        self.data = self._data()
        make_run_folder(self.run_dir)  # the inputs are checked: now the output, before any training
        if self.components.vocabulary is not None:  # None: a model trained elsewhere, on captions unknown here
            self.components.vocabulary |= vocabulary(self.data.data.captions)
        self.loaders = {}  # batch size -> batch iterator
        self.unet, self.vae, self.text_encoder = self.components.unet, self.components.vae, self.components.text_encoder
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        if options.text_steps is None:
            options.text_steps = 0 if self.fine_tuning and not options.new_text_encoder else 1000
        # The UNet stage trains the UNet alone, as ModelScope's sits on a frozen CLIP text encoder: trained along
        # with a UNet from scratch, a text encoder only sharpens the words that UNet already uses (colours), and
        # leaves the rest (directions) as faint as at initialisation, which the UNet then never learns to read.
        self.unet.requires_grad_(True)
        self.vae.requires_grad_(not self.fine_tuning)  # fine-tuning keeps the model's VAE
        self.text_encoder.requires_grad_(False)
        self.parameters = list(self.unet.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.lr, weight_decay=0.01)
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=options.vae_lr)
        self.matcher = CaptionMatcher(self.text_encoder.config.hidden_size).to(self.device)
        self.text_parameters = [*self.text_encoder.parameters(), *self.matcher.parameters()]
        self.text_optimizer = torch.optim.AdamW(self.text_parameters, lr=options.text_lr, weight_decay=0.01)
        self.ema = EMAModel(self.parameters, decay=options.ema_decay, use_ema_warmup=True, power=0.75)
        self.noise_schedule = DDPMScheduler.from_config(self.components.schedule or MODELSCOPE_SCHEDULE)
        if self._resuming:
            self._load_training_state()
        self.started, self.seconds_before = time.monotonic(), self.progress["seconds"]

    # ------------------------------------------------------------------------------------------------------- setup

    def _precision(self, name: str):
        if name not in ("auto", "fp32", "bf16", "fp16"):
            raise UsageError(f"unknown precision {name!r}; choose auto, fp32, bf16 or fp16")
        if name == "auto":
            if self.device.type == "cuda":
                name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                from .devices import cpu_supports_bf16
                name = "bf16" if cpu_supports_bf16() else "fp32"
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        scaler = torch.amp.GradScaler(self.device.type) if name == "fp16" else None
        return dtype, scaler

    @property
    def _resuming(self) -> bool:
        return self.options.resume and (self.checkpoint_dir / TRAINING_STATE / "progress.json").is_file()

    def _initial_components(self) -> tuple[Components, Architecture]:
        options = self.options
        requested = ARCHITECTURES.get(options.architecture or "tiny")
        if requested is None:
            raise UsageError(f"unknown architecture {options.architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        if self._resuming:
            saved = json.loads((self.checkpoint_dir / TRAINING_STATE / "progress.json").read_text())
            if saved.get("format") != STATE_FORMAT:
                raise UsageError(f"{self.checkpoint_dir} was written by an older vidsynth and cannot be resumed; "
                                 f"use another --out, or --no-resume to start over there")
            if options.architecture and saved["architecture_name"] != options.architecture:
                raise UsageError(f"{self.checkpoint_dir} was trained as {saved['architecture_name']!r}, not "
                                 f"{options.architecture!r}; use another --out or the same architecture")
            self.progress = saved["progress"]
            options.init = saved["init"]
            arch = Architecture(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["architecture"].items()})
            components = load_components(str(self.checkpoint_dir))
            return components, arch
        if options.init:
            components = load_components(options.init)
            if options.architecture and not _same_architecture(components, requested):
                raise UsageError(f"--init model {options.init} does not have the {options.architecture!r} "
                                 f"architecture ({architecture_of(components)}); drop --architecture to fine-tune it as it is")
            if options.new_text_encoder:
                # For a model whose encoder lost words: retraining that encoder separates them less than a new one.
                components.text_encoder = CLIPTextModel(components.text_encoder.config)
            defaults = components.defaults
            arch = Architecture(frames=defaults.frames, size=defaults.height, vae_channels=tuple(components.vae.config.block_out_channels),
                                **{k: tuple(v) if isinstance(v, list) else v for k, v in architecture_of(components).items()
                                   if k != "vae_channels"})
            return components, arch
        return build_components(requested), requested

    def _data(self) -> ClipStream:
        if self.options.data == "procedural":
            data = ProceduralClips(self.arch.frames, self.arch.size)
            return ClipStream(data, seed=self.options.seed + self.progress["step"])
        return ClipStream(VideoFolder(Path(self.options.data), self.arch.frames, self.arch.size), seed=self.options.seed)

    def _workers(self) -> int:
        if self.options.workers is not None:
            return self.options.workers
        # On a GPU, drawing clips in the training process would leave the GPU waiting; on the CPU, workers would
        # take cores from the training itself.
        return min(8, max(0, (os.cpu_count() or 1) - 2)) if self.device.type == "cuda" else 0

    def _batch(self, size: Optional[int] = None) -> tuple[torch.Tensor, list[str]]:
        size = size or self.options.batch_size
        if size not in self.loaders:
            workers = self._workers()
            loader = torch.utils.data.DataLoader(self.data, batch_size=size, num_workers=workers,
                                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
            self.loaders[size] = iter(loader)
        clips, captions = next(self.loaders[size])
        video = clips.to(self.device, non_blocking=True)  # batch x frames x H x W x 3, uint8
        return video.permute(0, 1, 4, 2, 3).float() / 127.5 - 1, list(captions)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ----------------------------------------------------------------------------------------------------- stages

    def run(self) -> Path:
        try:
            if not self.fine_tuning and self.progress["vae_step"] < self.options.vae_steps:
                self.train_vae()
            if self.progress["text_step"] < self.options.text_steps and not self._out_of_time():
                self.train_text_encoder()
            if not self._out_of_time():
                self.train_unet()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        self.save_checkpoint()
        return self.checkpoint_dir

    def _out_of_time(self) -> bool:
        limit = self.options.max_minutes
        return limit is not None and time.monotonic() - self.started >= limit * 60

    def _run_stage(self, counter: str, total: int, name: str, step) -> None:
        """Call `step()` (one optimiser step, returning its loss) until `total` steps are counted in
        `self.progress[counter]` or time is up, with a progress bar and a checkpoint every `checkpoint_every`."""
        bar = tqdm(total=total, initial=self.progress[counter], desc=name, unit="step")
        while self.progress[counter] < total and not self._out_of_time():
            loss = step()
            self.progress[counter] += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.progress[counter] % self.options.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()

    def train_vae(self) -> None:
        """Stage 1: the autoencoder, on single frames: reconstruction of the posterior mean plus a small KL term.

        Decoding the mean rather than a sample: a fresh posterior starts with unit variance, and learning it away at
        a KL weight this small takes thousands of steps during which the latents are mostly noise. The KL term only
        keeps the means bounded; `_encode` uses the mean too.
        """
        self.vae.train()
        self._run_stage("vae_step", self.options.vae_steps, "VAE", self._vae_step)
        self.vae.eval()
        self._set_latent_scale()
        if self.progress["vae_step"] == self.options.vae_steps:
            self.save_checkpoint()  # a finished autoencoder is kept even if the UNet stage is stopped early

    def _vae_step(self) -> torch.Tensor:
        # One frame from each of many clips: frames of one clip are near copies, so they teach little more.
        video, _ = self._batch(VAE_FRAMES_PER_STEP)
        frames = video[torch.arange(len(video)), torch.randint(video.shape[1], (len(video),))]
        with self._autocast():
            posterior = self.vae.encode(frames).latent_dist
            reconstruction = self.vae.decode(posterior.mode()).sample
        loss = F.mse_loss(reconstruction.float(), frames) + 1e-6 * posterior.kl().mean()
        self._step(loss, self.vae_optimizer, list(self.vae.parameters()), max_grad_norm=None)
        return loss

    def train_text_encoder(self) -> None:
        """Stage 2: the text encoder, contrastively against the clips themselves (`CaptionMatcher`), so that every
        word a clip shows, direction included, changes the encoding the UNet will read."""
        self.text_encoder.requires_grad_(True).train()
        self.matcher.train()
        self._run_stage("text_step", self.options.text_steps, "text", self._text_step)
        self.text_encoder.requires_grad_(False).eval()
        if self.progress["text_step"] == self.options.text_steps:
            self.save_checkpoint()

    def _text_step(self) -> torch.Tensor:
        video, captions = self._batch(max(self.options.batch_size, TEXT_BATCH_MINIMUM))
        with self._autocast():
            pooled = self.text_encoder(self._token_ids(captions)).pooler_output
            loss = self.matcher.loss(video, pooled, captions)
        self._step(loss, self.text_optimizer, self.text_parameters)
        return loss

    def _token_ids(self, captions: list[str]) -> torch.Tensor:
        tokens = self.components.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt")
        return tokens.input_ids.to(self.device)

    @torch.no_grad()
    def _set_latent_scale(self) -> None:
        # As in Stable Diffusion: scale latents to unit variance so the noise schedule fits them.
        video, _ = self._batch()
        latents = self.vae.encode(video.flatten(0, 1)).latent_dist.mode()
        self.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

    @torch.no_grad()
    def _encode(self, video: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
        batch, frames = video.shape[:2]
        with self._autocast():
            latents = self.vae.encode(video.flatten(0, 1)).latent_dist.mode().float()
        latents = latents * self.vae.config.scaling_factor
        latents = latents.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)  # batch x 4 x frames x h x w
        dropped = torch.rand(batch).tolist()
        captions = ["" if r < self.options.caption_dropout else c for r, c in zip(dropped, captions)]
        return latents, captions

    def train_unet(self) -> None:
        """Stage 3: the denoiser, on the schedule's objective (velocity from scratch), the text encoder frozen."""
        self.vae.eval()
        self.text_encoder.eval()
        self.unet.train()
        self._run_stage("step", self.options.steps, "UNet", self._unet_step)

    def _unet_step(self) -> torch.Tensor:
        latents, captions = self._encode(*self._batch())
        noise = torch.randn_like(latents)
        t = sample_timesteps(len(latents), self.noise_schedule.config.num_train_timesteps,
                             self.options.pure_noise_fraction, self.device)
        noisy = self.noise_schedule.add_noise(latents, noise, t)
        warmup = min(1.0, (self.progress["step"] + 1) / 100)
        for group in self.optimizer.param_groups:
            group["lr"] = self.options.lr * warmup
        with self._autocast(), torch.no_grad():
            context = self.text_encoder(self._token_ids(captions)).last_hidden_state
        with self._autocast():
            prediction = self.unet(noisy, t, encoder_hidden_states=context).sample
        target = self.noise_schedule.get_velocity(latents, noise, t) if self._predicts_velocity else noise
        per_video = F.mse_loss(prediction.float(), target, reduction="none").mean((1, 2, 3, 4))
        loss = (self._loss_weights(t) * per_video).mean()
        self._step(loss, self.optimizer, self.parameters)
        self.ema.step(self.parameters)
        return loss

    @property
    def _predicts_velocity(self) -> bool:
        return self.noise_schedule.config.prediction_type == "v_prediction"

    def _loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        # Min-SNR-5 (Hang et al. 2023): measured as an error in the clean latents, an epsilon loss weighs each step
        # by its SNR and a v loss by SNR + 1; capping that weight at 5 stops the nearly clean steps, which say little
        # about the prompt, from dominating the gradient (the paper reports about 3x faster convergence). Below the
        # cap the objective's own weight stays: for v that is at least 1, so the pure-noise steps, where the caption
        # alone decides colour and layout, keep their full say.
        alphas = self.noise_schedule.alphas_cumprod.to(t.device)[t]
        snr = alphas / (1 - alphas)
        weight = snr + 1 if self._predicts_velocity else snr
        return weight.clamp(max=MIN_SNR_GAMMA) / weight

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list,
              max_grad_norm: Optional[float] = 1.0) -> None:
        """Backward and one optimiser step, through the fp16 gradient scaler when there is one."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if not math.isfinite(loss.item()):
            raise VidsynthError(f"training diverged (loss {loss.item()}) at {self.progress}; "
                                f"lower --lr or use --precision fp32")

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Write the checkpoint beside the current one, then swap; on any failure the previous one stays."""
        self.progress["seconds"] = self.seconds_before + time.monotonic() - self.started
        partial = self.run_dir / f".{CHECKPOINT}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
            try:
                defaults = ModelDefaults(**{**self.components.defaults.as_dict(), **self.options.defaults})
                self.components.defaults = defaults
                save_model_folder(self.components, partial)
            finally:
                self.ema.restore(self.parameters)
            state = partial / TRAINING_STATE
            state.mkdir()
            for name in ("unet", "text_encoder", "vae", "matcher"):
                save_model(getattr(self, name), str(state / f"{name}.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "vae_optimizer": self.vae_optimizer.state_dict(),
                        "text_optimizer": self.text_optimizer.state_dict(), "ema": self.ema.state_dict()},
                       state / "optimizer.pt")
            (state / "progress.json").write_text(json.dumps({
                "format": STATE_FORMAT, "progress": self.progress, "architecture_name": self.options.architecture or ("tiny" if not self.fine_tuning else None),
                "architecture": asdict(self.arch), "init": self.options.init,
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.options).items()},
            }, indent=2) + "\n")
        except Exception as exc:
            reason = refused_write_reason(exc)
            if reason is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            raise WriteError(f"could not write a checkpoint in {self.run_dir} ({reason}); the previous checkpoint is "
                             f"kept", reason) from None
        previous = self.run_dir / f".{CHECKPOINT}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, previous)
        os.replace(partial, self.checkpoint_dir)
        shutil.rmtree(previous, ignore_errors=True)

    def _load_training_state(self) -> None:
        state = self.checkpoint_dir / TRAINING_STATE
        for name in ("unet", "text_encoder", "vae", "matcher"):
            load_model(getattr(self, name), str(state / f"{name}.safetensors"), device=str(self.device))
        saved = torch.load(state / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.vae_optimizer.load_state_dict(saved["vae_optimizer"])
        self.text_optimizer.load_state_dict(saved["text_optimizer"])
        self.ema.load_state_dict(saved["ema"])


def train(options: TrainOptions) -> Path:
    return Trainer(options).run()
