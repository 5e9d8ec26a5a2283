"""Fast paths that must not change the result beyond rounding: the prompt's keys and values once per video, Winograd
convolutions on the CPU (UNet, VAE decoder and encoder), the compiled UNet, CUDA graphs; a sampler that never waits
for the device between steps; and on the CPU freed memory reused while denoising, decoding and encoding, or the
low-memory mode when a video would not fit."""

import contextlib
import functools
import os
import platform
import resource
import unittest.mock
import warnings

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

import vidsynth
from vidsynth import GenerationRequest
from conftest import randomize, tiny_unet
from vidsynth.attention import text_attention_per_video
from vidsynth.caching import noise_prediction
from vidsynth import convolution
from vidsynth.convolution import (TemporalConvAs2d, Winograd3x3, WinogradTemporal, is_3x3, rewritten_convolutions,
                                  winograd_conv2d)
from vidsynth import cpu_memory, pipeline as pipeline_module
from vidsynth.cpu_memory import available_memory_bytes, freed_memory_reused
from vidsynth.cuda_graphs import CudaGraphedForward
from vidsynth.devices import is_out_of_memory
from vidsynth.loading import load_components
from vidsynth.pipeline import compile_unet, convolution_rewrites, denoising_memory_bytes, frames_per_decode


def test_text_attention_per_video_gives_the_plain_result_with_one_projection_per_video():
    unet = randomize(tiny_unet(), 5)
    videos, frames = 2, 3
    sample, context = torch.randn(videos, 4, frames, 16, 16), torch.randn(videos, 77, 32)
    cross = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert cross
    projected_rows = []
    for layer in cross:
        layer.to_k.register_forward_hook(lambda module, args, out: projected_rows.append(args[0].shape[0]))
    with torch.no_grad():
        plain = unet(sample, torch.tensor(400), encoder_hidden_states=context).sample
        assert set(projected_rows) == {videos * frames}
        projected_rows.clear()
        originals = [layer.processor for layer in cross]
        with text_attention_per_video(unet, frames):
            shared = unet(sample, torch.tensor(400), encoder_hidden_states=context).sample
        assert set(projected_rows) == {videos}
    assert [layer.processor for layer in cross] == originals  # restored after the block
    assert torch.allclose(shared, plain, atol=1e-5), (shared - plain).abs().max()


@pytest.mark.parametrize("input_shape, kernel", [
    ((2, 8, 12, 16), (5, 8, 3, 3)),  # whole 4x4 tiles
    ((1, 3, 10, 7), (6, 3, 3, 3)),  # partial tiles at the edges
    ((1, 4, 1, 1), (4, 4, 3, 3)),  # smaller than a tile
    ((2, 8, 5, 9), (4, 8, 3, 1)),  # temporal: 3 taps over frames, none over pixels
    ((2, 8, 5, 9), (4, 8, 1, 3)),  # 3 taps along rows only
])
def test_winograd_convolution_gives_conv2d_results(input_shape, kernel):
    generator = torch.Generator().manual_seed(0)
    input, weight = torch.randn(input_shape, generator=generator), torch.randn(kernel, generator=generator)
    for bias in (torch.randn(kernel[0], generator=generator), None):
        direct = torch.nn.functional.conv2d(input, weight, bias, padding=(kernel[2] // 2, kernel[3] // 2))
        strided = input.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
        for winograd in (winograd_conv2d(input, weight, bias), winograd_conv2d(strided, weight, bias)):
            assert winograd.shape == direct.shape
            assert torch.allclose(winograd, direct, rtol=0, atol=1e-5 * direct.abs().max()), \
                (winograd - direct).abs().max()


@pytest.mark.parametrize("kernel", [(5, 8, 3, 3), (4, 8, 3, 1)])
def test_winograd_convolution_of_many_images_runs_in_passes_with_the_one_pass_result(kernel, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    input, weight = torch.randn(5, 8, 10, 9, generator=generator), torch.randn(kernel, generator=generator)
    bias = torch.randn(kernel[0], generator=generator)
    one_pass = winograd_conv2d(input, weight, bias)
    passes = []
    real_pass = convolution._tiles_into
    monkeypatch.setattr(convolution, "_tiles_into", lambda output, *args: passes.append(len(output)) or
                        real_pass(output, *args))
    one_image_tiles = 36 * 8 * 3 * 3 * 4 if kernel[3] == 3 else 6 * 8 * 3 * 9 * 4  # elements x channels x tiles x 4 B
    monkeypatch.setattr(convolution, "TILES_BUDGET_BYTES", 2 * one_image_tiles)
    several = winograd_conv2d(input, weight, bias)
    assert passes == [2, 2, 1]
    assert torch.allclose(several, one_pass, rtol=0, atol=1e-5 * one_pass.abs().max())  # bmm blocks differ: rounding
    direct = torch.nn.functional.conv2d(input, weight, bias, padding=(kernel[2] // 2, kernel[3] // 2))
    assert torch.allclose(several, direct, rtol=0, atol=1e-5 * direct.abs().max())


@pytest.mark.parametrize("winograd", [True, False])
def test_rewritten_convolutions_give_the_plain_unet_result(winograd, monkeypatch):
    monkeypatch.setattr(convolution, "WINOGRAD_MIN_CHANNELS", 1)  # the tiny UNet's layers are narrower than the bar
    unet = randomize(tiny_unet(), 6)
    sample, context = torch.randn(2, 4, 5, 16, 16), torch.randn(2, 77, 32)
    spatial = [m for m in unet.modules() if type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3)
               and m.stride == (1, 1)]
    temporal = [m for m in unet.modules() if type(m) is torch.nn.Conv3d]
    assert spatial and temporal and all(m.kernel_size == (3, 1, 1) for m in temporal)
    with torch.no_grad():
        plain = unet(sample, torch.tensor(300), encoder_hidden_states=context).sample
        winograd_kernels, conv2d_kernels = [], []
        real_winograd, real_conv2d = convolution.winograd_conv2d, torch.nn.functional.conv2d

        def counting_winograd(input, weight, bias):
            winograd_kernels.append(tuple(weight.shape[-2:]))
            return real_winograd(input, weight, bias)

        def counting_conv2d(input, weight, *args, **kwargs):
            conv2d_kernels.append(tuple(weight.shape[-2:]))
            return real_conv2d(input, weight, *args, **kwargs)

        with (rewritten_convolutions(unet, winograd),
              unittest.mock.patch.object(convolution, "winograd_conv2d", counting_winograd),
              unittest.mock.patch("torch.nn.functional.conv2d", counting_conv2d)):
            assert all(type(m) is (WinogradTemporal if winograd else TemporalConvAs2d) for m in temporal)
            assert all(type(m) is (Winograd3x3 if winograd else torch.nn.Conv2d) for m in spatial)
            fast = unet(sample, torch.tensor(300), encoder_hidden_states=context).sample
    if winograd:  # every layer ran in Winograd's algorithm
        assert winograd_kernels.count((3, 3)) == len(spatial) and winograd_kernels.count((3, 1)) == len(temporal)
    else:  # every temporal layer ran as a 2-D convolution
        assert not winograd_kernels and conv2d_kernels.count((3, 1)) == len(temporal)
    assert all(type(m) is torch.nn.Conv2d for m in spatial) and all(type(m) is torch.nn.Conv3d for m in temporal)
    assert torch.allclose(fast, plain, rtol=0, atol=1e-4 * plain.abs().max()), (fast - plain).abs().max()


def test_decoding_on_the_cpu_runs_winograd_convolutions_with_the_plain_frames(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(convolution, "WINOGRAD_MIN_CHANNELS", 1)  # the tiny VAE's layers are narrower than the bar
    vae = tiny_pipeline.components.vae
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(latents[0].transpose(0, 1) / vae.config.scaling_factor).sample
    plain = ((plain + 1) / 2).clamp(0, 1).mul(255).round().permute(0, 2, 3, 1).numpy()
    spatial = [m for m in vae.decoder.modules() if is_3x3(m)]
    winograd_kernels, chunks = [], []
    real_winograd = convolution.winograd_conv2d

    def counting_winograd(input, weight, bias):
        winograd_kernels.append(tuple(weight.shape[-2:]))
        return real_winograd(input, weight, bias)

    with unittest.mock.patch.object(convolution, "winograd_conv2d", counting_winograd):
        fast = tiny_pipeline.decode(latents, lambda k, n: chunks.append((k, n)))
    assert chunks == [(1, 1)]  # three 16x16 frames fit in one chunk on the CPU
    assert spatial and winograd_kernels == [(3, 3)] * len(spatial)  # every 3x3 layer ran in Winograd's algorithm
    assert all(type(m) is torch.nn.Conv2d for m in spatial)  # restored after decoding
    assert fast.shape == plain.shape and np.abs(fast.astype(int) - plain).max() <= 1


def test_encoding_a_start_video_on_the_cpu_runs_winograd_convolutions_with_the_plain_latents(tiny_pipeline,
                                                                                             monkeypatch):
    monkeypatch.setattr(convolution, "WINOGRAD_MIN_CHANNELS", 1)
    vae = tiny_pipeline.components.vae
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        plain = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    spatial = [m for m in vae.encoder.modules() if is_3x3(m)]
    winograd_kernels = []
    real_winograd = convolution.winograd_conv2d

    def counting_winograd(input, weight, bias):
        winograd_kernels.append(tuple(weight.shape[-2:]))
        return real_winograd(input, weight, bias)

    request = GenerationRequest(prompt="x", frames=3, height=32, width=32, init_video="start.npy")
    with unittest.mock.patch.object(convolution, "winograd_conv2d", counting_winograd):
        fast = tiny_pipeline.encode_video(frames, request, lambda k, n: None)
    assert spatial and len(winograd_kernels) >= len(spatial)  # the encoder's 3x3 layers (stride 1) ran in Winograd's
    assert all(type(m) is torch.nn.Conv2d for m in spatial)  # restored after encoding
    torch.testing.assert_close(fast[0].transpose(0, 1), plain, rtol=0, atol=1e-4 * plain.abs().max().item())


def test_the_cpu_decodes_a_pixel_budget_at_a_time_other_devices_8_frames(tiny_model_dir):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [frames_per_decode(cpu, h, w) for h, w in [(256, 256), (320, 576), (64, 64), (2048, 2048)]] == [2, 1, 32, 1]
    assert frames_per_decode(cuda, 256, 256) == frames_per_decode(cuda, 64, 64) == 8
    chunks = []
    told = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", decode_chunk=2)
    told("a red circle", frames=5, height=32, width=32, steps=1, seed=0, callback=lambda event: chunks.append(
        (event.step, event.total)) if event.phase == "decode" and event.step else None)
    assert chunks == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("dtype, side, channels", [
    (torch.bfloat16, 8, 256),  # half precision
    (torch.float32, 2, 256),  # smaller than a tile
    (torch.float32, 8, 128),  # narrower than Winograd pays for
])
def test_winograd_layers_leave_other_cases_to_the_direct_convolution(dtype, side, channels):
    layer = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype)
    input = torch.randn(1, channels, side, side, dtype=dtype)
    with torch.no_grad():
        direct = layer(input)
        with rewritten_convolutions(layer):
            assert type(layer) is Winograd3x3
            assert torch.equal(layer(input), direct)
        winograd = winograd_conv2d(input.float(), layer.weight.float(), layer.bias.float())
    assert not torch.equal(winograd, direct.float())  # Winograd's rounding differs: equality above means direct ran


def test_compiled_unet_gives_the_plain_frames_and_compiles_once_per_shape(tiny_model_dir, tiny_pipeline, monkeypatch):
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward  # the captured graph as it is: this checks the capture and its guards, not inductor

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(
        model, backend=counting_backend, dynamic=options["dynamic"]))
    torch._dynamo.reset()
    compiled = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", compile=True)
    settings = dict(frames=3, height=32, width=32, steps=3, seed=4, progress=False)

    def same_as_plain(prompt, **changes):
        made = compiled(prompt, **{**settings, **changes}).frames
        plain = tiny_pipeline(prompt, **{**settings, **changes}).frames
        return np.abs(made.astype(int) - plain).max() <= 1

    assert same_as_plain("a red circle")
    compiled_once = len(graphs)
    assert compiled_once >= 1
    assert same_as_plain("a blue square", guidance=7.0)
    assert len(graphs) == compiled_once  # same shapes, another prompt and guidance: no recompilation
    assert same_as_plain("a red circle", frames=4)
    assert len(graphs) > compiled_once  # another shape: compiled for it
    assert same_as_plain("a red circle", cache_interval=2)  # deep-feature reuse runs uncompiled, same result


def test_warm_up_compiles_for_what_the_models_own_video_runs(held_compile):
    held_compile.release.set()
    held_compile.pipeline.warm_up()
    assert len(held_compile.compiled_at) == 2  # the shipped model guides its first steps only: batches of 2 and 1
    held_compile.pipeline("a red circle moving left on a black background", steps=2, progress=False)
    assert len(held_compile.compiled_at) == 2


def test_compiling_for_cuda_asks_torch_compile_for_cuda_graphs(monkeypatch):
    requests = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: requests.append(options) or model)
    unet = tiny_unet()
    assert compile_unet(unet, torch.device("cuda")) is unet
    assert requests == [{"mode": "reduce-overhead", "dynamic": False}]


def test_convolution_rewrites_by_device_and_compiling():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert convolution_rewrites(cpu, compiled=False, cache_interval=1) == (True, True)
    assert convolution_rewrites(cpu, compiled=True, cache_interval=1) == (True, False)  # weights frozen as they are
    assert convolution_rewrites(cpu, compiled=True, cache_interval=2) == (True, True)  # deep-feature reuse: uncompiled
    assert convolution_rewrites(cuda, compiled=False, cache_interval=1) == (False, False)
    assert convolution_rewrites(cuda, compiled=True, cache_interval=1) == (True, False)  # channels-last throughout
    assert convolution_rewrites(torch.device("mps"), compiled=False, cache_interval=1) == (True, False)  # no Conv3d


@pytest.mark.skipif(not os.environ.get("VIDSYNTH_SLOW"), reason="compiles with inductor, minutes on 2 cores: "
                    "opt in with VIDSYNTH_SLOW=1")
def test_inductor_compiled_unet_with_frozen_weights_gives_the_plain_frames(tiny_model_dir, tiny_pipeline):
    torch._dynamo.reset()
    compiled = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", compile=True)
    settings = dict(frames=3, height=32, width=32, steps=3, seed=4, progress=False)
    made = compiled("a red circle", **settings).frames
    plain = tiny_pipeline("a red circle", **settings).frames
    assert np.abs(made.astype(int) - plain).max() <= 1


class FakeGraph:
    """torch.cuda.CUDAGraph on the CPU: a forward run while "capturing" records how to recompute its output in place,
    and replaying recomputes it, so the test sees whatever the wrapper left in the input buffers."""
    capturing = None
    captured = 0

    def __init__(self):
        self.recompute = None

    def replay(self):
        self.recompute()


@contextlib.contextmanager
def fake_capture(graph, pool=None):
    FakeGraph.capturing = graph
    FakeGraph.captured += 1
    try:
        yield
    finally:
        FakeGraph.capturing = None


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    stream = unittest.mock.Mock()
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    FakeGraph.captured = 0


def recordable(unet):
    """The UNet's noise prediction, recorded into the graph being captured, if any."""
    def forward(sample, timestep, context):
        out = noise_prediction(unet)(sample, timestep, context)
        graph = FakeGraph.capturing
        if graph is not None:
            graph.recompute = lambda: out.copy_(noise_prediction(unet)(sample, timestep, context))
        return out
    return forward


def test_cuda_graphed_forward_replays_with_each_calls_inputs_and_one_capture_per_shape(fake_cuda_graphs):
    unet = randomize(tiny_unet(), 7)
    graphed = CudaGraphedForward(recordable(unet))
    generator = torch.Generator().manual_seed(0)

    def inputs(batch, frames=3):
        return (torch.randn(batch, 4, frames, 16, 16, generator=generator), torch.tensor(int(torch.randint(1000, (1,)))),
                torch.randn(batch, 77, 32, generator=generator))

    with torch.no_grad():
        calls = [inputs(2), inputs(2), inputs(2)]
        outputs = [graphed(*call) for call in calls]
        assert FakeGraph.captured == 1  # one shape: captured once, replayed after
        for call, output in zip(calls, outputs):  # each output is its own (a clone), computed from its own inputs
            assert torch.equal(output, noise_prediction(unet)(*call))
        unguided = inputs(1)
        assert torch.equal(graphed(*unguided), noise_prediction(unet)(*unguided))
        assert FakeGraph.captured == 2 and len(graphed.steps) == 2
        longer = inputs(2, frames=4)
        assert torch.equal(graphed(*longer), noise_prediction(unet)(*longer))
        assert FakeGraph.captured == 3 and len(graphed.steps) == 2  # the least recently used graph was let go
        assert torch.equal(graphed(*calls[0]), outputs[0])
        assert FakeGraph.captured == 4  # the guided shape had been let go: captured again


def test_cuda_graphed_forward_runs_eagerly_when_capturing_fails(fake_cuda_graphs):
    unet = randomize(tiny_unet(), 7)

    def refuses_capture(sample, timestep, context):
        if FakeGraph.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return noise_prediction(unet)(sample, timestep, context)

    graphed = CudaGraphedForward(refuses_capture)
    sample, context = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad(), pytest.warns(UserWarning, match="running it eagerly"):
        assert torch.equal(graphed(sample, 500, context), noise_prediction(unet)(sample, torch.tensor(500), context))
    with torch.no_grad():
        assert torch.equal(graphed(sample, 400, context), noise_prediction(unet)(sample, torch.tensor(400), context))
    assert graphed.failed and FakeGraph.captured == 1  # not tried again


@pytest.mark.parametrize("ending_the_capture_fails", [False, True])
def test_cuda_graphed_forward_leaves_running_out_of_memory_to_the_caller(fake_cuda_graphs, ending_the_capture_fails):
    """A video too large for the GPU must not turn CUDA graphs off for the smaller ones after it."""
    unet = randomize(tiny_unet(), 7)

    def too_large_to_capture(sample, timestep, context):
        if sample.shape[2] > 3 and FakeGraph.capturing is not None:
            try:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            finally:  # a failed capture can fail again as it ends, with the out-of-memory error as its context
                if ending_the_capture_fails:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return recordable(unet)(sample, timestep, context)

    graphed = CudaGraphedForward(too_large_to_capture)
    small, large = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 8, 16, 16)
    context = torch.randn(2, 77, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "running it eagerly"
        with pytest.raises(RuntimeError) as raised:
            graphed(large, 500, context)
        assert is_out_of_memory(raised.value) and not graphed.failed
        assert torch.equal(graphed(small, 500, context), noise_prediction(unet)(small, torch.tensor(500), context))
    assert FakeGraph.captured == 2 and len(graphed.steps) == 1  # the small video's step was captured


@pytest.fixture(scope="module")
def meta_pipeline(tiny_model_dir):
    return vidsynth.Pipeline(load_components(str(tiny_model_dir), dtype=torch.float32), torch.device("meta"),
                             torch.float32)


@pytest.mark.parametrize("settings", [dict(scheduler="ddim"), dict(scheduler="ddim", eta=0.5), dict(scheduler="dpm++"),
                                      dict(scheduler="unipc"), dict(scheduler="euler"), dict(preset="fast"),
                                      dict(scheduler="ddim", strength=0.5), dict(scheduler="dpm++", strength=0.5),
                                      dict(scheduler="euler", strength=0.5)],
                         ids=["ddim", "ddim-eta", "dpm++", "unipc", "euler", "fast", "ddim-from-a-video",
                              "dpm++-from-a-video", "euler-from-a-video"])
def test_the_sampler_never_reads_the_devices_tensors_between_steps(meta_pipeline, settings, tmp_path):
    """A read of a GPU tensor on the host makes the CPU wait for the GPU, which then idles while the CPU prepares the
    next step. The meta device holds no values, so any such read fails there: the steps must all run, and only the
    finiteness check after the last one may read the latents."""
    start = None
    if "strength" in settings:  # video-to-video: the start video's latents are noised on the device first
        np.save(tmp_path / "start.npy", np.zeros((3, 32, 32, 3), np.uint8))
        settings = {**settings, "init_video": str(tmp_path / "start.npy")}
        start = torch.zeros(1, 4, 3, 4, 4)
    request = meta_pipeline.prepare(vidsynth.GenerationRequest.create(prompt="a red circle", steps=4, frames=3,
                                                                      height=32, width=32, seed=0, **settings))
    positive, negative = meta_pipeline.encode_text(["a red circle", ""])
    noise = pipeline_module.initial_noise(torch.Generator().manual_seed(0), 3, 4, 4, frames_first=start is not None)
    steps = []
    with pytest.raises(RuntimeError, match="meta tensors"):
        meta_pipeline.denoise(noise, positive, negative, request, torch.Generator().manual_seed(0),
                              lambda step, total: steps.append(step), start=start)
    assert steps == list(range(1, request.denoising_steps + 1)) and len(steps) == (2 if start is not None else 4)


glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="memory reuse is set through glibc's mallopt")
BLOCK = 256 * 2**20
PAGES = BLOCK // os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def faults_while(work) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def fill_and_free(times: int = 1) -> None:
    for _ in range(times):
        torch.ones(BLOCK // 4)


@glibc_only
def test_freed_memory_is_reused_within_the_block_and_handed_back_after():
    with freed_memory_reused():
        fill_and_free(3)  # glibc's heap grows by up to two blocks before freed neighbours merge to fit the next one
        kept = resident_bytes()
        assert faults_while(lambda: fill_and_free(4)) < PAGES // 100  # no fresh pages: the freed memory is reused
        assert resident_bytes() - kept < BLOCK // 8
    assert kept - resident_bytes() > BLOCK * 3 // 4  # the free memory went back to the system on leaving


@glibc_only
@pytest.mark.parametrize("phase", ["denoise", "decode", "encode_video"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_the_cpu_pipeline_reuses_freed_memory_except_in_the_low_memory_mode(tiny_model_dir, phase, low_memory,
                                                                            tmp_path):
    pipeline = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", forward_chunking=low_memory)
    faults = []

    def measure(event):
        if event.phase == phase and event.step == 1:
            fill_and_free(3)  # as in the test above, where the blocks after these reuse their memory
            faults.append(faults_while(lambda: fill_and_free(4)))

    np.save(tmp_path / "start.npy", np.zeros((2, 32, 32, 3), np.uint8))
    start = {"init_video": str(tmp_path / "start.npy")} if phase == "encode_video" else {}
    pipeline("a red circle", frames=2, height=32, width=32, steps=2, seed=0, callback=measure, **start)
    assert faults
    if low_memory:
        assert faults[0] > PAGES  # every block arrived as fresh pages
    else:
        assert faults[0] < PAGES // 100


@glibc_only
def test_a_generation_on_the_cpu_leaves_no_free_memory_resident(tiny_pipeline):
    piece = 64 * 2**10  # under glibc's mmap threshold: served from the heap
    pinned = []

    def heap_pieces():
        return [torch.ones(piece // 4) for _ in range(BLOCK // piece)]

    def fill_the_heap_as_decoding_does(event):
        if event.phase == "denoise" and event.step == 1:
            pieces = heap_pieces()
            pinned.append(torch.ones(piece // 4))  # above them, so the heap cannot shrink back over them
            del pieces
        elif event.phase == "decode" and event.step == 1:
            heap_pieces()  # the heap's free memory, paged back in and freed again

    before = resident_bytes()
    tiny_pipeline("a red circle", frames=2, height=32, width=32, steps=2, seed=0, callback=fill_the_heap_as_decoding_does)
    assert pinned
    assert resident_bytes() - before < BLOCK // 4


def test_available_memory_is_read_from_the_system():
    available = available_memory_bytes()
    if platform.system() != "Linux":
        assert available is None
        return
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < available <= total


def test_memory_room_is_the_least_a_cgroup_or_its_ancestors_leave(tmp_path):
    def group(path, limit, usage, inactive):
        folder = tmp_path / path
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"cache 5\ninactive_file 1\ntotal_inactive_file {inactive}\n")

    unlimited = 9223372036854771712  # how cgroup v1 writes "no limit"
    group(".", unlimited, 900, 0)
    group("service", 1000, 700, 100)  # 1000 - (700 - 100) = 400 left
    group("service/job", unlimited, 300, 0)
    headroom = functools.partial(cpu_memory._cgroup_headroom, tmp_path, limit_file="memory.limit_in_bytes",
                                 usage_file="memory.usage_in_bytes", inactive_key="total_inactive_file")
    assert headroom("/service/job") == 400  # the parent's limit binds
    group("service/job", 350, 300, 50)
    assert headroom("/service/job") == 100
    assert headroom("/") is None  # nothing limited


def test_the_low_memory_mode_is_chosen_by_the_memory_a_video_needs(tiny_model_dir, monkeypatch):
    automatic = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32")
    low_memory = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", forward_chunking=True)
    default = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", forward_chunking=False)
    heap_reused, feed_forward_rows = [], []
    real_reuse = pipeline_module.freed_memory_reused
    monkeypatch.setattr(pipeline_module, "freed_memory_reused", lambda: heap_reused.append(True) or real_reuse())
    blocks = [m for m in automatic.components.unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        block.ff.register_forward_hook(lambda _, args, __: feed_forward_rows.append(tuple(args[0].shape[:2])))
    frames, side, settings = 3, 32, dict(height=32, width=32, steps=2, seed=2, progress=False)
    latent = side // automatic.components.vae_scale_factor
    need = denoising_memory_bytes(automatic.components.unet.config, frames, latent, latent, 2, torch.float32)

    def made_with(available, pipeline=automatic):
        heap_reused.clear(), feed_forward_rows.clear()
        monkeypatch.setattr(pipeline_module, "available_memory_bytes", lambda: available)
        return pipeline("a red circle", frames=frames, **settings).frames

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roomy = made_with(need)  # it just fits: the default mode
        assert len(heap_reused) == 2 and all(1 not in rows for rows in feed_forward_rows)  # denoising and decoding
        assert np.array_equal(made_with(0, default), roomy)  # chosen explicitly: the default mode whatever is free
        assert len(heap_reused) == 2
    with pytest.warns(UserWarning, match="low-memory mode"):
        tight = made_with(need - 1)
    assert not heap_reused and feed_forward_rows and all(1 in rows for rows in feed_forward_rows)
    assert np.array_equal(tight, made_with(2**50, low_memory))  # chosen explicitly: low-memory whatever is free
    assert all(block._chunk_size is None for block in blocks)  # whole feed-forward calls again after the video
    assert np.abs(tight.astype(int) - roomy).max() <= 1  # chunked products add in another order
