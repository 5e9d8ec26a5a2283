"""Fast paths that approximate: deep-feature reuse (DeepCache), guidance on part of the steps, and the presets."""

import numpy as np
import torch

from conftest import randomize, tiny_unet
from vidsynth.caching import DeepFeatureCache
from vidsynth.request import GenerationRequest, ModelDefaults


def test_the_shallow_path_with_fresh_deep_features_is_the_full_forward():
    unet = randomize(tiny_unet(), 3)
    sample, context = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 77, 32)
    cache = DeepFeatureCache(unet, interval=3)
    with torch.no_grad():
        full = cache(sample, torch.tensor(500), context)  # a full step keeps the deep features
        shallow = cache.run_shallow(sample, torch.tensor(500), context, cache.deep)
        plain = unet(sample, torch.tensor(500), encoder_hidden_states=context).sample
    assert torch.equal(full, plain)
    assert torch.allclose(shallow, plain, atol=1e-5)


def test_cache_runs_the_full_unet_every_interval_steps():
    unet = randomize(tiny_unet(), 3)
    full_runs = []
    unet.mid_block.register_forward_hook(lambda *args: full_runs.append(1))
    cache = DeepFeatureCache(unet, interval=3)
    with torch.no_grad():
        for _ in range(7):
            cache(torch.randn(1, 4, 2, 16, 16), torch.tensor(10), torch.randn(1, 77, 32))
    assert len(full_runs) == 3  # steps 0, 3 and 6


def test_presets_fill_only_what_was_not_given():
    defaults = ModelDefaults(steps=50)
    fast = GenerationRequest(prompt="x", preset="fast").resolve(defaults)
    assert (fast.scheduler, fast.steps, fast.cache_interval, fast.guidance_fraction) == ("dpm++", 20, 3, 0.5)
    own = GenerationRequest(prompt="x", preset="fast", scheduler="ddim", steps=30, cache_interval=1).resolve(defaults)
    assert (own.scheduler, own.steps, own.cache_interval, own.guidance_fraction) == ("ddim", 30, 1, 0.5)
    plain = GenerationRequest(prompt="x").resolve(defaults)
    assert (plain.scheduler, plain.steps, plain.cache_interval, plain.guidance_fraction) == ("ddim", 50, 1, 1.0)
    assert GenerationRequest(prompt="x", preset="balanced").resolve(defaults).steps == 25


def test_guidance_fraction_guides_only_the_first_steps(tiny_pipeline):
    batches = []
    hook = tiny_pipeline.components.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        tiny_pipeline("a prompt", frames=2, height=32, width=32, steps=4, guidance_fraction=0.5, progress=False)
    finally:
        hook.remove()
    assert batches == [2, 2, 1, 1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_fast_preset_stays_close_to_the_default(shipped_pipeline):
    # Stated tolerance for the approximations on the shipped model: same-seed PSNR against the default sampling.
    prompt = "a red circle moving left on a black background"
    reference = shipped_pipeline(prompt, seed=2, progress=False).frames
    for fields, floor in [({"cache_interval": 2}, 25.0), ({"guidance_fraction": 0.5}, 20.0), ({"preset": "fast"}, 16.0)]:
        frames = shipped_pipeline(prompt, seed=2, progress=False, **fields).frames
        assert psnr(frames, reference) >= floor, (fields, psnr(frames, reference))
        assert not np.array_equal(frames, reference)
