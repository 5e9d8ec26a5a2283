"""The text-to-video pipeline: text encoding, classifier-free-guided denoising of video latents (from noise, or from
a start video's latents for video-to-video), frame decoding.

`load()` gives a Pipeline; `Pipeline.generate(request, callback)` is the one function every front end calls.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import replace
from typing import Callable, Optional, Union

import numpy as np
import torch
from diffusers.models import Transformer2DModel, TransformerTemporalModel

from . import __version__
from .attention import text_attention_per_video
from .caching import DeepFeatureCache, noise_prediction
from .convolution import rewritten_convolutions
from .cpu_memory import available_memory_bytes, free_memory_handed_back, freed_memory_reused
from .cuda_graphs import CudaGraphedForward
from .data import caption_words
from .devices import OFFLOAD_MODES, device_memory_bytes, dtype_name, is_out_of_memory, resolve_device, resolve_dtype
from .errors import NumericalError, OutOfMemoryError, RequestError
from .events import Callback, Event, emit
from .loading import Components, ModelReference, load_components
from .request import MAX_FPS, MAX_FRAMES, GenerationRequest
from .schedulers import make_scheduler
from .text import encode_texts, padded_to_match
from .video import Video, Videos, read_start_video

LATENT_CHANNELS = 4
# ms-1.7b in float32 on the CPU held 2.6 GiB beyond its weights at 16 frames 256x256 and 7.2-10.0 GiB at 64 frames
# 256x256 and at 24 frames 576x320 (BENCHMARKS.md, "Long and large videos"): 44-67 bytes per unit of
# `denoising_memory_bytes`, rounded up since the reused heap's fragmentation varies from run to run.
DENOISING_BYTES_PER_UNIT = 70
# Frames the VAE decodes at a time. On the CPU, as many as fit in two 256x256 frames' pixels: decoding there runs
# Winograd's convolutions in reused memory, which at the default video took 48 s where 8 frames at a time of direct
# convolutions took 90 s, at the same peak; larger chunks of it peaked 2.7 GiB higher (BENCHMARKS.md). Elsewhere 8.
CPU_DECODE_PIXELS = 2 * 256 * 256
DECODE_FRAMES = 8
MAX_WORDS_LISTED = 60  # a model's vocabulary is spelt out in its warning up to this size


def load(model: ModelReference = None, *, device: str = "auto", dtype: str = "auto", offload: str = "none",
         forward_chunking: Optional[bool] = None, compile: bool = False,
         decode_chunk: Optional[int] = None) -> "Pipeline":
    """Load a model (alias, folder or hub id; the shipped model when None) ready to generate. `forward_chunking`:
    the low-memory mode on (True), off (False) or, on the CPU, chosen per video by the memory it needs (None).
    `decode_chunk`: frames the VAE decodes (and encodes) at a time (None: by device and frame size)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    components = load_components(model, dtype=torch_dtype)
    return Pipeline(components, torch_device, torch_dtype, offload=offload, forward_chunking=forward_chunking,
                    compile=compile, decode_chunk=decode_chunk)


def initial_noise(generator: torch.Generator, frames: int, latent_height: int, latent_width: int,
                  frames_first: bool = False) -> torch.Tensor:
    """The starting noise of one video (1 x channels x frames x height x width), from a CPU generator so a seed gives
    the same video on any machine. `frames_first` draws it frame after frame, as diffusers' video-to-video pipeline
    does (its text-to-video one draws channel after channel): with it the same seed gives the same video there."""
    if not frames_first:
        return torch.randn((1, LATENT_CHANNELS, frames, latent_height, latent_width), generator=generator)
    noise = torch.randn((frames, LATENT_CHANNELS, latent_height, latent_width), generator=generator)
    return noise.permute(1, 0, 2, 3).unsqueeze(0)


@contextlib.contextmanager
def feed_forward_one_frame_at_a_time(unet: torch.nn.Module):
    """Within the block each feed-forward call sees one frame's tokens, so its 4x-wide intermediate is one frame's,
    not the batch's.

    diffusers' `enable_forward_chunking` takes one axis for all blocks; the axis that holds frames differs between
    spatial blocks (frames x tokens) and temporal blocks (pixels x frames), and chunking over tokens (its documented
    setting for this model) makes thousands of tiny calls per layer.
    """
    blocks = [(block, 1 if isinstance(module, TransformerTemporalModel) else 0) for module in unet.modules()
              if isinstance(module, (Transformer2DModel, TransformerTemporalModel))
              for block in module.transformer_blocks]
    for block, frame_axis in blocks:
        block.set_chunk_feed_forward(chunk_size=1, dim=frame_axis)
    try:
        yield
    finally:
        for block, _ in blocks:
            block.set_chunk_feed_forward(chunk_size=None)


def denoising_memory_bytes(unet_config, frames: int, latent_height: int, latent_width: int, batch: int,
                           dtype: torch.dtype) -> int:
    """About how much a denoising step on the CPU holds beyond the weights in the default mode (reused heap, whole
    feed-forward layers): proportional to the latent voxels, the batch, the dtype's size and the UNet's width."""
    units = frames * latent_height * latent_width * batch * dtype.itemsize * unet_config.block_out_channels[0]
    return DENOISING_BYTES_PER_UNIT * units


def frames_per_decode(device: torch.device, height: int, width: int) -> int:
    """How many frames of `height` x `width` pixels the VAE decodes at a time unless told."""
    if device.type == "cpu":
        return max(1, CPU_DECODE_PIXELS // (height * width))
    return DECODE_FRAMES


def compile_unet(unet: torch.nn.Module, device: torch.device) -> Callable:
    """The UNet compiled once per video shape (frames, size, batch with or without guidance); inductor's caches on
    disk make later processes compile faster. On CUDA the whole step is also captured as a CUDA graph. Elsewhere the
    weights are frozen into the graph, which lets oneDNN pre-pack them for its convolutions and matrix products: the
    UNet's weights must not change after the first call."""
    if device.type == "cuda":
        return torch.compile(unet, mode="reduce-overhead", dynamic=False)
    from torch._inductor import config as inductor_config  # inductor is heavy to import: only when compiling

    compiled = torch.compile(unet, dynamic=False)

    def with_frozen_weights(*args, **kwargs):
        # Compilation happens inside the call; torch.compile's `options={"freezing": True}` does not reach inductor's
        # freezing pass (torch 2.13), a config patch around the call does.
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)
    return with_frozen_weights


def convolution_rewrites(device: torch.device, compiled: bool, cache_interval: int) -> tuple[bool, bool]:
    """Whether a denoising run's temporal convolutions run as 2-D ones, and whether in Winograd's algorithm.

    On the CPU both (faster there, BENCHMARKS.md), except Winograd in a compiled UNet: freezing would fold the
    transformed weights into constants, 4x the 3x3 ones (deep-feature reuse runs uncompiled). On CUDA only in a
    compiled UNet: inductor stores activations channels-last only around 2-D convolutions, so with 3-D temporal ones
    the layout would change back and forth; eagerly on CUDA 2-D temporal convolutions gained nothing. On MPS always
    2-D: PyTorch's 3-D convolutions there run at about a tenth of its 2-D rate (pytorch/pytorch#192213), and older
    releases had none.
    """
    if device.type == "cpu":
        return True, not compiled or cache_interval > 1
    return compiled or device.type == "mps", False


class Pipeline:
    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype, *, offload: str = "none",
                 forward_chunking: Optional[bool] = None, compile: bool = False,
                 decode_chunk: Optional[int] = None):
        if offload not in OFFLOAD_MODES:
            raise RequestError("offload", f"unknown offload mode {offload!r}; choose from {', '.join(OFFLOAD_MODES)}")
        if decode_chunk is not None and decode_chunk < 1:
            raise RequestError("decode_chunk", "must be at least 1")
        self.components = components
        self.device, self.dtype = device, dtype
        self.offload = offload if device.type != "cpu" else "none"  # offloading to the CPU from the CPU is a no-op
        if compile and self.offload != "none":
            raise RequestError("compile", "cannot be combined with offloading, which moves weights during the step")
        self.decode_chunk = decode_chunk
        self.models = (components.text_encoder, components.unet, components.vae)
        for module in self.models:
            if next(module.parameters()).dtype != dtype:  # converted checkpoints arrive in float32
                module.to(dtype=dtype)
        self.forward_chunking = forward_chunking
        if self.offload == "sequential":
            from accelerate import cpu_offload
            for module in self.models:
                cpu_offload(module, execution_device=device)
        elif self.offload == "none":
            for module in self.models:
                module.to(device)
        self.compiled = compile
        # The UNet's forward for the plain steps: compiled, or on CUDA replayed from CUDA graphs of its eager kernels
        # (not with offloading, which moves the weights a graph points to).
        if compile:
            self.unet_forward = noise_prediction(compile_unet(components.unet, device))
        elif device.type == "cuda" and self.offload == "none":
            self.unet_forward = CudaGraphedForward(noise_prediction(components.unet))
        else:
            self.unet_forward = None

    @property
    def name(self) -> str:
        return self.components.name

    @property
    def defaults(self):
        return self.components.defaults

    def __repr__(self) -> str:
        return f"Pipeline(model={self.name!r}, device={self.device}, dtype={dtype_name(self.dtype)})"

    def __call__(self, prompt: Union[str, list[str], None] = None, *, callback: Callback = None,
                 progress: bool = True, **settings) -> Union[Video, Videos]:
        """Generate from a prompt and settings (the fields of GenerationRequest). One video, or a list of them."""
        request = GenerationRequest.create(prompt=prompt if prompt is not None else "", **settings)
        if progress and callback is None:
            from .progress import ProgressBar
            with ProgressBar() as bar:
                videos = self.generate(request, bar)
        else:
            videos = self.generate(request, callback)
        return videos[0] if len(videos) == 1 else videos

    # ------------------------------------------------------------------------------------------------ the main loop

    def generate(self, request: GenerationRequest, callback: Callback = None) -> Videos:
        """Make every video the request asks for. Warnings reach the callback as events with a message; raise
        Cancelled from it to stop. Running out of memory raises OutOfMemoryError, saying what needs less."""
        try:
            return self._generate(request, callback)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
        # Raised past the handler: raised in it, the new error would hold the old one's traceback, and through it the
        # failed run's tensors, for as long as a caller (a server's worker, a notebook) keeps the new error.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemoryError(self.out_of_memory_advice())

    @torch.inference_mode()  # modules built by hand may still require grad: never keep activations for autograd
    def _generate(self, request: GenerationRequest, callback: Callback) -> Videos:
        request, source = self._prepare(request)
        prompts, count = request.prompts, request.total_videos
        latent_shape = self.latent_shape(request)
        low_memory, memory_warning = self.memory_mode(latent_shape, request)
        for message in [*self.prompt_warnings(request), memory_warning]:
            if message:
                emit(callback, Event("encode", 0, 1, 0, count, message=message))
        emit(callback, Event("encode", 0, 1, 0, count))
        with self._using(self.components.text_encoder):
            negative, empty, *positives = self.encode_text([request.negative_prompt, "", *prompts])
        emit(callback, Event("encode", 1, 1, 0, count))
        start = None  # the latents of the video to start from, for video-to-video
        if source is not None:
            start = self.encode_video(source, request,
                                      lambda k, n: emit(callback, Event("encode_video", k, n, 0, count)))

        videos = Videos()
        with free_memory_handed_back():  # the host's heap, whatever the device
            for index in range(count):
                prompt_index = index // request.num_videos
                seed = request.seed + index
                # One generator per video: the initial noise, then any noise a stochastic sampler draws.
                generator = torch.Generator("cpu").manual_seed(seed)
                noise = initial_noise(generator, *latent_shape[2:], frames_first=source is not None)
                latents = self.denoise(noise, *padded_to_match(positives[prompt_index], negative, empty), request,
                                       generator, lambda k, n: emit(callback, Event("denoise", k, n, index, count)),
                                       low_memory, start)
                frames = self.decode(latents, lambda k, n: emit(callback, Event("decode", k, n, index, count)),
                                     low_memory)
                settings = self.settings_for(request, prompts[prompt_index], seed)
                videos.append(Video(frames=frames, fps=request.fps, settings=settings))
        emit(callback, Event("done", 1, 1, count - 1, count))
        return videos

    def warm_up(self, callback: Callback = None) -> None:
        """Compile (with `compile=True`) or capture the UNet for the model's own video now rather than in the first
        request's time: a few denoising steps of it, nothing decoded. `callback` may raise to stop it."""
        steps_per_batch = 3 if self.device.type == "cuda" else 1  # a CUDA graph tree records on a function's 2nd call
        # A model that guides only its first steps runs the UNet on two batch sizes, guided and not: both are warmed.
        batches = 2 if self.defaults.guidance_fraction < 1 and self.defaults.guidance != 1.0 else 1
        request = self.prepare(GenerationRequest.create(prompt="", allow_empty_prompt=True, seed=0,
                                                        steps=steps_per_batch * batches, guidance_fraction=1 / batches))
        latent_shape = self.latent_shape(request)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = initial_noise(generator, *latent_shape[2:])
        low_memory, memory_warning = self.memory_mode(latent_shape, request)
        if memory_warning:
            emit(callback, Event("denoise", 0, 1, message=memory_warning))
        with torch.inference_mode():
            with self._using(self.components.text_encoder):
                text, = self.encode_text([""])
            self.denoise(noise, text, text, request, generator, lambda k, n: emit(callback, Event("denoise", k, n)),
                         low_memory)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with this model's defaults and a seed filled in, checked against what the model can make."""
        return self._prepare(request)[0]

    def _prepare(self, request: GenerationRequest) -> tuple[GenerationRequest, Optional[np.ndarray]]:
        """`prepare`, and the frames of the video to start from (video-to-video; a still image is repeated), as many
        as the request makes."""
        defaults, source = self.defaults, None
        if request.init_video is not None:
            source, rate = read_start_video(request.init_video)
            if len(source) > 1:  # the start video's length and frame rate stand in for the model's
                defaults = replace(defaults, frames=len(source),
                                   fps=min(max(round(rate), 1), MAX_FPS) if rate else defaults.fps)
        request = request.resolve(defaults)
        scale = self.components.vae_scale_factor
        for side in ("height", "width"):
            if getattr(request, side) % scale:
                raise RequestError(side, f"must be a multiple of {scale} for this model")
        if source is None:
            return request, None
        if len(source) == 1:  # a still image: every frame starts from it (image-to-video)
            source = np.repeat(source, request.frames, axis=0)
        if request.frames > MAX_FRAMES:  # taken from the start video: a request's own frames are validated
            raise RequestError("init_video", f"has more than the {MAX_FRAMES} frames vidsynth makes at a time: set "
                                             f"frames to start from its first ones")
        if request.frames > len(source):
            raise RequestError("frames", f"the video to start from has only {len(source)}")
        if request.denoising_steps < 1:
            raise RequestError("strength", f"{request.strength} of {request.steps} steps is less than one step; "
                               f"raise strength or steps")
        return request, source[:request.frames]

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        """The shape of one video's latents: 1 x channels x frames x height x width."""
        scale = self.components.vae_scale_factor
        return 1, LATENT_CHANNELS, request.frames, request.height // scale, request.width // scale

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        """What the person asking should know about the prompts: words that a model vidsynth trained never saw in its
        captions (it cannot draw what they say)."""
        known = self.components.vocabulary
        if known is None:
            return []
        texts = [*request.prompts, request.negative_prompt]
        unknown = list(dict.fromkeys(word for text in texts for word in caption_words(text) if word not in known))
        if not unknown:
            return []
        words = ", ".join(sorted(known)) if len(known) <= MAX_WORDS_LISTED else f"{len(known)} words"
        return [f"{self.name} never saw {', '.join(map(repr, unknown))} in its training captions and cannot draw what "
                f"{'it says' if len(unknown) == 1 else 'they say'}; it knows: {words}. A full-size model such as "
                f"ms-1.7b reads any prompt"]

    def encode_text(self, texts: list[str]) -> list[torch.Tensor]:
        """Each text's encoding, 1 x tokens x width: 77 tokens, or for a longer text 77 for each window of it."""
        return encode_texts(self.components.tokenizer, self.components.text_encoder, texts, self.device)

    def denoise(self, noise: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                request: GenerationRequest, generator: torch.Generator, on_step,
                low_memory: bool = False, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The video's latents, denoised from `noise`; or, given the latents of a video to `start` from, from those
        noised to the level of the last `request.denoising_steps` steps of the schedule, which then run."""
        # Deep-feature reuse runs parts of the UNet by hand, so it always runs them uncompiled.
        unet = DeepFeatureCache(self.components.unet, request.cache_interval, self.unet_forward)
        scheduler = make_scheduler(request.scheduler, self.components.schedule)
        # The schedule stays on the CPU, where the sampler reads it: a timestep on the GPU indexing the scheduler's
        # tables makes the CPU wait for the GPU at every step, and the GPU then idles while the CPU prepares the next
        # step (8 ms a step for the compiled UNet on an H200, BENCHMARKS.md).
        scheduler.set_timesteps(request.steps)
        first = request.steps - request.denoising_steps
        timesteps = scheduler.timesteps[first:]
        unet_timesteps = timesteps.to(self.device)
        step_options = self._step_options(scheduler, request.eta, generator)
        guided_steps = math.ceil(len(timesteps) * request.guidance_fraction) if request.guidance != 1.0 else 0
        both = torch.cat([negative, positive])
        # Latents stay float32 between steps so half-precision models do not accumulate rounding in the sampler.
        if start is None:
            latents = noise.to(self.device) * scheduler.init_noise_sigma
        else:
            if hasattr(scheduler, "set_begin_index"):  # samplers that count their steps start counting at `first`
                scheduler.set_begin_index(first)
            latents = scheduler.add_noise(start.to(self.device), noise.to(self.device), timesteps[:1])
        temporal_2d, winograd = convolution_rewrites(self.device, self.compiled, request.cache_interval)
        with (self._using(self.components.unet), text_attention_per_video(self.components.unet, latents.shape[2]),
              rewritten_convolutions(self.components.unet, winograd) if temporal_2d else contextlib.nullcontext(),
              feed_forward_one_frame_at_a_time(self.components.unet) if low_memory else contextlib.nullcontext(),
              freed_memory_reused() if self.device.type == "cpu" and not low_memory else contextlib.nullcontext()):
            for step, t in enumerate(timesteps):
                if self.compiled and self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
                guided = step < guided_steps
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
                predicted = unet(model_input.to(self.dtype), unet_timesteps[step], both if guided else positive).float()
                if guided:
                    unconditional, conditional = predicted.chunk(2)
                    predicted = unconditional + request.guidance * (conditional - unconditional)
                latents = scheduler.step(predicted, t, latents, **step_options).prev_sample
                on_step(step + 1, len(timesteps))
        if not torch.isfinite(latents).all():
            raise NumericalError(f"the denoiser produced NaN/inf in {dtype_name(self.dtype)}; "
                                 f"run again with --dtype float32 (or bfloat16)")
        return latents

    def encode_video(self, frames: np.ndarray, request: GenerationRequest, on_chunk) -> torch.Tensor:
        """The latents of `frames` (uint8, F x H x W x 3) resized to the request's size, scaled as the UNet takes
        them: 1 x channels x frames x height x width, float32.

        The mode of the VAE's posterior, not a sample from it (diffusers' video-to-video pipeline samples): vidsynth's
        own models are trained on the mode and their posterior's spread means nothing (about 1), and ModelScope's VAE
        spreads far less than the noise the strength then adds."""
        vae = self.components.vae
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        if pixels.shape[-2:] != (request.height, request.width):
            pixels = torch.nn.functional.interpolate(pixels, size=(request.height, request.width), mode="bicubic",
                                                     antialias=True).clamp(0, 1)
        chunks = (pixels * 2 - 1).split(self.frames_per_chunk(request.height, request.width))
        latents = []
        with self._using(vae), self._vae_convolutions(low_memory=bool(self.forward_chunking)):
            for index, chunk in enumerate(chunks):
                mode = vae.encode(chunk.to(self.device, self.dtype)).latent_dist.mode()
                if not torch.isfinite(mode).all():
                    raise NumericalError(f"the VAE encoder overflowed in {dtype_name(self.dtype)}; "
                                         f"run again with --dtype float32 (or bfloat16)")
                latents.append(mode.float())
                on_chunk(index + 1, len(chunks))
        return (torch.cat(latents) * vae.config.scaling_factor).permute(1, 0, 2, 3).unsqueeze(0)

    def decode(self, latents: torch.Tensor, on_chunk, low_memory: bool = False) -> np.ndarray:
        vae = self.components.vae
        batch, channels, frames, height, width = latents.shape
        latents = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        latents = latents / vae.config.scaling_factor
        scale = self.components.vae_scale_factor
        chunks = latents.split(self.frames_per_chunk(height * scale, width * scale))
        images = []
        with self._using(vae), self._vae_convolutions(low_memory):
            for index, chunk in enumerate(chunks):
                decoded = vae.decode(chunk.to(self.dtype)).sample.float()
                if not torch.isfinite(decoded).all():
                    raise NumericalError(f"the VAE decoder overflowed in {dtype_name(self.dtype)}; "
                                         f"run again with --dtype float32 (or bfloat16)")
                # To bytes on the device: a quarter of the data to copy back, and no float pass over it on the host.
                images.append((((decoded + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                on_chunk(index + 1, len(chunks))
        return torch.cat(images).permute(0, 2, 3, 1).contiguous().numpy()  # frames x height x width x 3

    def out_of_memory_advice(self) -> str:
        """What to change when a video did not fit in memory, of what this pipeline can still change."""
        gpu = self.device.type != "cpu"
        changes = []
        if gpu and self.offload == "none":
            changes.append("--offload model (or --offload sequential: the least memory, slowest)")
        elif gpu and self.offload == "model":
            changes.append("--offload sequential")
        if not self.forward_chunking:
            changes.append("--forward-chunking")
        if gpu and self.dtype == torch.float32:
            changes.append("--dtype float16")
        changes.append("fewer frames or a smaller size")
        size = device_memory_bytes(self.device)
        on = f"{self.device.type}, {dtype_name(self.dtype)}" + (f", {size / 2**30:.1f} GiB" if size else "")
        return f"out of {'GPU ' if gpu else ''}memory making the video ({on}); try {', '.join(changes)}"

    def settings_for(self, request: GenerationRequest, prompt: str, seed: int) -> dict:
        """What a video file records about how it was made; enough to make it again."""
        settings = {
            "prompt": prompt, "negative_prompt": request.negative_prompt, "seed": seed, "steps": request.steps,
            "guidance": request.guidance, "scheduler": request.scheduler, "eta": request.eta, "preset": request.preset,
            "cache_interval": request.cache_interval, "guidance_fraction": request.guidance_fraction,
            "frames": request.frames, "height": request.height, "width": request.width, "fps": request.fps,
            "model": self.name, "dtype": dtype_name(self.dtype), "vidsynth_version": __version__,
        }
        if request.init_video is not None:
            settings.update(init_video=request.init_video, strength=request.strength)
        return settings

    # ------------------------------------------------------------------------------------------------------ helpers

    def frames_per_chunk(self, height: int, width: int) -> int:
        """How many frames of `height` x `width` pixels the VAE encodes or decodes at a time."""
        return self.decode_chunk or frames_per_decode(self.device, height, width)

    def memory_mode(self, latent_shape: tuple[int, ...], request: GenerationRequest) -> tuple[bool, str]:
        """Whether to make a video in the low-memory mode: feed-forward layers one frame at a time and, on the CPU,
        freed memory handed back rather than reused, in denoising and decoding (the reused heap fragments by
        gigabytes on long videos: 1.3-1.6x faster, up to 6 GiB more at 64 frames 256x256, BENCHMARKS.md). Chosen by
        `forward_chunking`, or when that is None, on the CPU, by whether the default mode's estimated need fits in
        the memory available; then with a warning saying so (empty otherwise)."""
        if self.forward_chunking is not None or self.device.type != "cpu":
            return bool(self.forward_chunking), ""
        _, _, frames, latent_height, latent_width = latent_shape
        batch = 1 if request.guidance == 1.0 else 2  # guided steps denoise the prompt's and the negative's batch
        need = denoising_memory_bytes(self.components.unet.config, frames, latent_height, latent_width, batch,
                                      self.dtype)
        available = available_memory_bytes()
        if available is None or need <= available:
            return False, ""
        return True, (f"this video needs about {need / 2**30:.1f} GiB beyond the weights and {available / 2**30:.1f} "
                      f"GiB is available: denoising in the low-memory mode (slower; --forward-chunking or "
                      f"--no-forward-chunking choose the mode yourself)")

    @contextlib.contextmanager
    def _vae_convolutions(self, low_memory: bool):
        """How the VAE's convolutions run. On the CPU Winograd's transformed tiles, in fresh memory each time, cost as
        much as they save: with the memory reused, decoding and encoding are 1.9x faster (BENCHMARKS.md). The
        low-memory mode keeps the heap small instead."""
        if self.device.type != "cpu" or low_memory:
            yield
            return
        with rewritten_convolutions(self.components.vae), freed_memory_reused():
            yield

    @contextlib.contextmanager
    def _using(self, module: torch.nn.Module):
        """With model offload, keep only the module in use on the accelerator."""
        if self.offload != "model":
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _step_options(scheduler, eta: float, generator: torch.Generator) -> dict:
        accepted = inspect.signature(scheduler.step).parameters
        options = {}
        if "eta" in accepted:
            options["eta"] = eta
        if "generator" in accepted:
            options["generator"] = generator
        return options
