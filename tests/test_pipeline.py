"""Generation behaviour on a tiny random model: seeds, batching, samplers, progress, cancellation, failures."""

import copy
import warnings
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention import FeedForward
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput

import vidsynth
from vidsynth import (Cancelled, GenerationRequest, NumericalError, OutOfMemoryError, devices,
                      pipeline as pipeline_module)
from vidsynth.schedulers import MODELSCOPE_SCHEDULE, SCRATCH_SCHEDULE

SMALL = dict(frames=3, height=32, width=32, steps=3)


def frames_of(pipeline, prompt="a red circle moving left", **settings):
    return pipeline(prompt, progress=False, **{**SMALL, **settings}).frames


def test_same_seed_same_frames_different_seed_different_frames(tiny_pipeline):
    first, again = frames_of(tiny_pipeline, seed=5), frames_of(tiny_pipeline, seed=5)
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - frames_of(tiny_pipeline, seed=6)).mean() > 5


def test_video_i_uses_seed_plus_i_and_prompts_batch(tiny_pipeline):
    videos = tiny_pipeline(["a red circle", "a blue square"], num_videos=2, seed=10, progress=False, **SMALL)
    assert [v.seed for v in videos] == [10, 11, 12, 13]
    assert [v.settings["prompt"] for v in videos] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert np.array_equal(videos[1].frames, frames_of(tiny_pipeline, "a red circle", seed=11))
    assert np.array_equal(videos[3].frames, frames_of(tiny_pipeline, "a blue square", seed=13))


def test_seed_left_out_is_drawn_and_recorded(tiny_pipeline):
    video = tiny_pipeline("a red circle", progress=False, **SMALL)
    assert isinstance(video.seed, int) and video.seed >= 0
    assert np.array_equal(video.frames, frames_of(tiny_pipeline, "a red circle", seed=video.seed))
    expected_keys = {"prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "eta", "frames", "height",
                     "width", "fps", "model", "dtype", "vidsynth_version", "preset", "cache_interval", "guidance_fraction"}
    assert set(video.settings) == expected_keys


def test_negative_prompt_changes_the_video(tiny_pipeline):
    plain = frames_of(tiny_pipeline, seed=1)
    assert not np.array_equal(plain, frames_of(tiny_pipeline, seed=1, negative_prompt="blurry"))


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "euler"])
def test_other_samplers_run_deterministically(tiny_pipeline, scheduler):
    video = frames_of(tiny_pipeline, seed=3, scheduler=scheduler)
    assert np.array_equal(video, frames_of(tiny_pipeline, seed=3, scheduler=scheduler))
    assert not np.array_equal(video, frames_of(tiny_pipeline, seed=3))


def test_eta_adds_seeded_noise(tiny_pipeline):
    stochastic = frames_of(tiny_pipeline, seed=3, eta=1.0)
    assert np.array_equal(stochastic, frames_of(tiny_pipeline, seed=3, eta=1.0))
    assert not np.array_equal(stochastic, frames_of(tiny_pipeline, seed=3, eta=0.0))


def test_events_cover_every_phase_in_order(tiny_pipeline):
    events = []
    tiny_pipeline("a red circle", callback=events.append, num_videos=2, seed=0, **SMALL)
    phases = [e.phase for e in events]
    assert phases[0] == "encode" and phases[-1] == "done"
    assert [e.step for e in events if e.phase == "denoise" and e.video == 1] == [1, 2, 3]
    assert "decode" in phases
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_cancel_from_the_callback_stops_within_one_step(tiny_pipeline):
    seen = []

    def cancel_at_step_two(event):
        seen.append(event)
        if event.phase == "denoise" and event.step == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        tiny_pipeline("a red circle", callback=cancel_at_step_two, seed=0, **{**SMALL, "steps": 10})
    denoise_steps = [e.step for e in seen if e.phase == "denoise"]
    assert denoise_steps == [1, 2]


def test_nan_is_reported_with_a_remedy_not_written(tiny_model_dir):
    pipeline = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32")
    with torch.no_grad():
        pipeline.components.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NumericalError, match="--dtype float32"):
        pipeline("a red circle", progress=False, seed=0, **SMALL)


CPU_ALLOCATOR_FAILURE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")


def cpu_allocator_fails():
    raise RuntimeError(CPU_ALLOCATOR_FAILURE)


def numpy_allocation_fails():
    raise MemoryError("Unable to allocate 64.0 GiB for an array with shape (256, 2048, 2048, 3) and data type uint8")


def cuda_allocator_fails():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def cuda_graph_capture_fails_as_it_ends():
    try:
        cuda_allocator_fails()
    finally:
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


@pytest.mark.parametrize("fail", [cpu_allocator_fails, numpy_allocation_fails, cuda_allocator_fails,
                                  cuda_graph_capture_fails_as_it_ends])
def test_running_out_of_memory_says_what_to_change_and_frees_the_run(tiny_pipeline, monkeypatch, fail):
    held = []

    def denoise(*args, **kwargs):
        latents = torch.zeros(1, 4, 3, 4, 4)
        held.append(weakref.ref(latents))
        fail()

    monkeypatch.setattr(tiny_pipeline, "denoise", denoise)
    with pytest.raises(OutOfMemoryError, match=r"out of memory .*\(cpu, float32\); try --forward-chunking, fewer "
                                               r"frames or a smaller size$") as raised:
        frames_of(tiny_pipeline)
    assert raised.value.__context__ is None and held[0]() is None  # the failed run's tensors are gone
    def has_a_bug(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(tiny_pipeline, "denoise", has_a_bug)
    with pytest.raises(RuntimeError, match="^bug$"):  # any other failure is left as it is
        frames_of(tiny_pipeline)


def test_out_of_memory_advice_names_the_gpus_size_and_what_is_left_to_change(tiny_pipeline, monkeypatch):
    on_gpu = copy.copy(tiny_pipeline)
    on_gpu.device, on_gpu.dtype = torch.device("cuda"), torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=85520809984))
    assert on_gpu.out_of_memory_advice() == (
        "out of GPU memory making the video (cuda, float32, 79.6 GiB); try --offload model (or --offload sequential: "
        "the least memory, slowest), --forward-chunking, --dtype float16, fewer frames or a smaller size")
    monkeypatch.undo()  # a size torch cannot tell is left out
    if not torch.cuda.is_available():
        assert on_gpu.out_of_memory_advice().startswith("out of GPU memory making the video (cuda, float32); try")
    on_gpu.offload, on_gpu.forward_chunking, on_gpu.dtype = "model", True, torch.float16
    assert on_gpu.out_of_memory_advice().endswith("try --offload sequential, fewer frames or a smaller size")


def test_fast_paths_match_the_plain_path(tiny_model_dir, tiny_pipeline):
    plain = frames_of(tiny_pipeline, seed=2)
    chunked = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", forward_chunking=True, decode_chunk=1)
    feed_forward_inputs = []
    for module in chunked.components.unet.modules():
        if isinstance(module, FeedForward):
            module.register_forward_hook(lambda _, args, __: feed_forward_inputs.append(tuple(args[0].shape[:2])))
    # Chunked matrix products add in another order: equal up to float rounding, so at most one uint8 level apart.
    assert np.abs(frames_of(chunked, seed=2).astype(int) - plain).max() <= 1
    # one frame per call: spatial blocks get 1 x pixels, temporal blocks get pixels x 1
    assert feed_forward_inputs and all(1 in shape for shape in feed_forward_inputs)
    assert {shape[0] == 1 for shape in feed_forward_inputs} == {True, False}


def test_decoding_in_chunks_gives_the_vaes_pixels_rounded_to_the_nearest_level(tiny_model_dir):
    pipeline = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", decode_chunk=2)
    latents = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    chunks = []
    frames = pipeline.decode(latents, lambda done, total: chunks.append((done, total)))
    vae = pipeline.components.vae
    with torch.no_grad():
        pixels = vae.decode(latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor).sample
    expected = np.rint(np.clip((pixels.permute(0, 2, 3, 1).numpy() + 1) / 2, 0, 1) * 255)
    assert chunks == [(1, 3), (2, 3), (3, 3)] and frames.dtype == np.uint8 and frames.flags.c_contiguous
    # Up to float rounding between decoding 2 frames and 5 at once: a pixel on a level's edge may fall either way.
    assert np.abs(frames.astype(int) - expected).max() <= 1 and (frames == expected).mean() > 0.99


def test_a_long_prompt_is_read_to_its_end(tiny_pipeline):
    opening = "a red circle moving left " * 20  # 100 tokens: the second window holds the last 25 and the end
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read, not cut with a warning
        red = frames_of(tiny_pipeline, opening + "on a red background", seed=0)
        blue = frames_of(tiny_pipeline, opening + "on a blue background", seed=0)
    assert not np.array_equal(red, blue)  # cut at 77 tokens, the two prompts would be the same


def test_a_callback_takes_the_warnings_as_events_in_place_of_python_warnings(shipped_pipeline, monkeypatch):
    monkeypatch.setattr(pipeline_module, "available_memory_bytes", lambda: 2**20)
    events = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped_pipeline(["a red car", "a blue square"], negative_prompt="blurry", callback=events.append, seed=0,
                         **SMALL)
    messages = [event.message for event in events if event.message]
    assert len(messages) == 2
    assert messages[0].startswith("vidsynth-tiny never saw 'car', 'blurry' in its training captions")
    assert "denoising in the low-memory mode" in messages[1]
    assert events.index(next(event for event in events if event.phase == "denoise")) > 2  # warned before any step


def test_the_progress_bar_prints_each_warning_once(shipped_pipeline, capsys):
    from vidsynth.progress import ProgressBar
    with ProgressBar(disable=True) as bar:
        for seed in (0, 1):  # as an evaluation does: one bar, many videos, the same warning each time
            shipped_pipeline("a red car", callback=bar, seed=seed, **SMALL)
    assert capsys.readouterr().err.count("vidsynth: warning: vidsynth-tiny never saw 'car'") == 1


@pytest.mark.filterwarnings("ignore:bfloat16 is emulated")  # on CPUs without native bf16: slow, still correct
def test_bfloat16_runs_close_to_float32(tiny_model_dir, tiny_pipeline):
    half = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16
    difference = np.abs(frames_of(half, seed=4).astype(int) - frames_of(tiny_pipeline, seed=4)).mean()
    assert difference < 8


@pytest.mark.parametrize("name, native_bf16, warned", [("float16", True, True), ("bfloat16", False, True),
                                                       ("bfloat16", True, False), ("float32", False, False),
                                                       ("auto", False, False)])
def test_half_precision_emulated_on_the_cpu_is_warned_about(monkeypatch, name, native_bf16, warned):
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: native_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        devices.resolve_dtype(name, torch.device("cpu"))
    assert any("emulated" in str(warning.message) for warning in caught) == warned


def test_request_is_resolved_against_model_defaults(tiny_pipeline):
    resolved = GenerationRequest(prompt="x").resolve(tiny_pipeline.defaults)
    assert (resolved.frames, resolved.steps, resolved.guidance) == (16, 50, 9.0)
    assert resolved.seed is not None


def test_generation_never_records_autograd_history():
    # Modules built by hand (not through load) still require grad; generation must not keep their activations.
    from conftest import build_diffusers_pipeline
    from vidsynth.loading import Components
    from vidsynth.pipeline import Pipeline
    from vidsynth.request import ModelDefaults
    parts = build_diffusers_pipeline(seed=4)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.requires_grad_(True)
    components = Components(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, unet=parts.unet, vae=parts.vae,
                            schedule=None, defaults=ModelDefaults(frames=2, height=32, width=32, steps=2), name="by hand")
    seen = []
    Pipeline(components, torch.device("cpu"), torch.float32)("a prompt", progress=False,
                                                             callback=lambda event: seen.append(torch.is_grad_enabled()))
    assert seen and not any(seen)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "unipc", "euler"])
@pytest.mark.parametrize("schedule", [MODELSCOPE_SCHEDULE, SCRATCH_SCHEDULE], ids=["epsilon", "velocity-zero-snr"])
def test_samplers_follow_the_models_prediction_type_and_schedule(tiny_model_dir, monkeypatch, scheduler, schedule):
    """A denoiser that knows the answer, speaking the model's parameterisation: every sampler must land on it."""
    pipeline = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32")
    pipeline.components.schedule = schedule
    alphas_cumprod = DDPMScheduler.from_config(schedule).alphas_cumprod
    side = SMALL["height"] // pipeline.components.vae_scale_factor
    answer = torch.randn(1, 4, SMALL["frames"], side, side, generator=torch.Generator().manual_seed(0))

    def oracle(sample, timestep, encoder_hidden_states, **kwargs):
        alpha = alphas_cumprod[int(timestep)]
        noise = (sample - alpha.sqrt() * answer) / (1 - alpha).sqrt()
        output = noise if schedule["prediction_type"] == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * answer
        return UNet3DConditionOutput(sample=output)

    monkeypatch.setattr(pipeline.components.unet, "forward", oracle)
    video = frames_of(pipeline, seed=0, scheduler=scheduler, steps=10, guidance=1.0)
    expected = pipeline.decode(answer, lambda k, n: None)
    # DDIM's last step lands on alphas_cumprod[0], not 1 (as ModelScope's), which leaves 3 % of the noise in
    assert np.abs(video.astype(int) - expected.astype(int)).max() <= (6 if scheduler == "ddim" else 2)
