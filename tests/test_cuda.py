"""The CUDA paths on a CUDA GPU. Skipped where there is none (CI has none); there the CPU tests check the same
paths' logic (test_fast_paths: the CUDA-graph wrapper with a stand-in graph, the sampler never reading the
device's tensors between steps)."""

import os

import numpy as np
import pytest
import torch

import vidsynth
from vidsynth.cuda_graphs import CudaGraphedForward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU tests check the "
                                "logic of these paths")
SETTINGS = dict(frames=3, height=32, width=32, steps=4, seed=4, progress=False)
SHIPPED_PROMPT = "a red circle moving left on a black background"


def difference(made: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.abs(made.astype(int) - expected.astype(int))


def test_cuda_graphs_give_the_eager_frames(tiny_model_dir):
    pipeline = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float32")
    assert isinstance(pipeline.unet_forward, CudaGraphedForward)
    settings = dict(SETTINGS, guidance_fraction=0.5)
    graphed = pipeline("a red circle", **settings).frames
    assert len(pipeline.unet_forward.steps) == 2 and not pipeline.unet_forward.failed  # guided and unguided steps
    again = pipeline("a red circle", **settings).frames
    pipeline.unet_forward = None
    eager = pipeline("a red circle", **settings).frames
    assert np.array_equal(graphed, again)
    assert difference(graphed, eager).max() <= 1


@pytest.mark.parametrize("dtype, mean, most", [("float16", 0.5, 8), ("bfloat16", 2.0, 32)])
def test_half_precision_stays_near_float32_on_the_cpu(dtype, mean, most):
    """The shipped model at its own settings (trained weights: random ones amplify rounding over the steps). The
    same comparison with the CPU's own half precision gave float16 mean 0.04 / max 1, bfloat16 0.54 / 8."""
    reference = vidsynth.load(device="cpu", dtype="float32")(SHIPPED_PROMPT, seed=1, progress=False).frames
    made = vidsynth.load(device="cuda", dtype=dtype)(SHIPPED_PROMPT, seed=1, progress=False).frames
    assert difference(made, reference).mean() < mean and difference(made, reference).max() <= most


def test_offloading_gives_the_same_frames(tiny_model_dir):
    expected = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float32")("a red circle", **SETTINGS).frames
    for offload in ("model", "sequential"):
        pipeline = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float32", offload=offload)
        assert pipeline.unet_forward is None  # a graph would point at weights that move
        assert difference(pipeline("a red circle", **SETTINGS).frames, expected).max() <= 1
        if offload == "model":
            assert next(pipeline.components.unet.parameters()).device.type == "cpu"  # back once it was used


def test_video_to_video_matches_the_cpu(tiny_model_dir, tmp_path):
    start = np.zeros((3, 32, 32, 3), np.uint8)
    start[:, 8:24, 8:24] = (200, 40, 40)
    np.save(tmp_path / "start.npy", start)
    settings = dict(SETTINGS, init_video=str(tmp_path / "start.npy"), strength=0.5)
    on_gpu = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float32")("a red square", **settings).frames
    on_cpu = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32")("a red square", **settings).frames
    # cuDNN may run float32 convolutions in TF32 (PyTorch's default), which rounds more than the CPU.
    assert difference(on_gpu, on_cpu).mean() < 0.5 and difference(on_gpu, on_cpu).max() <= 4


def test_warm_up_captures_what_the_models_own_video_needs(tiny_model_dir):
    pipeline = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float32")
    pipeline.warm_up()
    captured = dict(pipeline.unet_forward.steps)
    assert len(captured) == 1  # the guided step of the model's native video
    pipeline("a red circle", seed=0, steps=2, progress=False)  # the native size and guidance
    steps = pipeline.unet_forward.steps
    assert len(steps) == 1 and all(steps.get(key) is step for key, step in captured.items())  # replayed, not anew


def test_a_video_too_large_for_the_gpu_says_what_to_change_and_leaves_the_graphs_on(tiny_model_dir):
    pipeline = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float32")
    expected = pipeline("a red circle", **SETTINGS).frames
    captured = dict(pipeline.unet_forward.steps)
    before = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction(2**30 / torch.cuda.get_device_properties(0).total_memory)  # 1 GiB
    try:
        with pytest.raises(vidsynth.OutOfMemoryError, match=r"\(cuda, float32, \d+\.\d GiB\); try --offload model"):
            # The tiny VAE scales by 2: one of the UNet's first activations alone is 2 GiB.
            pipeline("a red circle", frames=32, height=1024, width=1024, steps=1, progress=False)
        assert torch.cuda.memory_allocated() <= before + 2**20  # the failed run's tensors are gone
        assert not pipeline.unet_forward.failed
        assert np.array_equal(pipeline("a red circle", **SETTINGS).frames, expected)
        assert all(pipeline.unet_forward.steps.get(key) is step for key, step in captured.items())  # replayed
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.skipif(not os.environ.get("VIDSYNTH_SLOW"), reason="compiles with inductor (minutes): opt in with "
                    "VIDSYNTH_SLOW=1")
def test_the_compiled_unet_gives_the_eager_frames(tiny_model_dir):
    torch._dynamo.reset()
    compiled = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float16", compile=True)
    made = compiled("a red circle", **SETTINGS).frames
    assert np.array_equal(compiled("a red circle", **SETTINGS).frames, made)  # replayed from its CUDA graphs
    eager = vidsynth.load(str(tiny_model_dir), device="cuda", dtype="float16")
    eager.unet_forward = None
    assert difference(made, eager("a red circle", **SETTINGS).frames).max() <= 2
