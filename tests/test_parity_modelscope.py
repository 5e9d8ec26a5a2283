"""A tiny ModelScope-layout checkpoint built from ModelScope's own classes: vidsynth's conversion must reproduce
ModelScope's text embedding, UNet output, decoded frames, and a whole DDIM generation."""

import numpy as np
import pytest
import torch

import vidsynth
from vidsynth.loading import load_components
from vidsynth.pipeline import initial_noise
from reference_code import modelscope_module, modelscope_text_embedding, open_clip_tokenizer

@pytest.fixture(scope="module")
def reference(modelscope_reference):
    return modelscope_reference


@pytest.fixture(scope="module")
def converted(reference):
    return load_components(str(reference["folder"]))


def test_loading_draws_no_initial_weights(reference):
    """The modules are built empty and take the checkpoint's tensors: no random initialisation to throw away."""
    torch.manual_seed(0)
    untouched = torch.rand(8)
    torch.manual_seed(0)
    components = load_components(str(reference["folder"]))
    assert torch.equal(torch.rand(8), untouched)
    assert all(not tensor.is_meta for module in (components.unet, components.vae, components.text_encoder)
               for tensor in [*module.parameters(), *module.buffers()])


def test_tokenizer_matches_open_clip(converted):
    prompts = ["A car flying in space.", "Hello, WORLD!!  naive cafe 123", "", "a " * 100]
    expected = open_clip_tokenizer()(prompts, context_length=77)
    ours = converted.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, expected)


def test_text_embedding_matches(reference, converted):
    ids = open_clip_tokenizer()(["a red circle moving left", ""], context_length=77)
    with torch.no_grad():
        expected = modelscope_text_embedding(reference["text"], ids)
        ours = converted.text_encoder(ids).last_hidden_state
    assert converted.text_encoder.config.num_hidden_layers == 1  # penultimate of 2
    assert (ours - expected).abs().max() <= 1e-4


def test_unet_output_matches(reference, converted):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 16, 16, generator=generator)
    context = torch.randn(1, 77, 1024, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        expected = reference["unet"](x, t, context)
        ours = converted.unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.01
    assert (ours - expected).abs().max() <= 1e-4


def test_decoded_frames_match(reference, converted):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference["vae"].decode(z)
        ours = converted.vae.decode(z).sample
    assert ours.shape == expected.shape == (3, 3, 64, 64)
    assert (ours - expected).abs().max() <= 1e-4


def test_whole_generation_matches_modelscope_sampler(reference):
    """ModelScope's own DDIM loop, UNet and decoder against vidsynth on the converted folder."""
    diffusion = modelscope_module("diffusion")
    seed, frames, steps, prompt = 7, 3, 5, "a blue square moving up"  # 5 steps divide 1000, as ModelScope assumes
    ids = open_clip_tokenizer()([prompt, ""], context_length=77)
    with torch.no_grad():
        cond, uncond = modelscope_text_embedding(reference["text"], ids).chunk(2)
        betas = diffusion.beta_schedule("linear_sd", 1000, init_beta=0.00085, last_beta=0.0120)
        sampler = diffusion.GaussianDiffusion(betas=betas, mean_type="eps", var_type="fixed_small", loss_type="mse",
                                              rescale_timesteps=False)
        noise = initial_noise(torch.Generator("cpu").manual_seed(seed), frames, 8, 8)
        x0 = sampler.ddim_sample_loop(noise=noise, model=reference["unet"], model_kwargs=[{"y": cond}, {"y": uncond}],
                                      guide_scale=9.0, ddim_timesteps=steps, eta=0.0)
        decoded = reference["vae"].decode((x0 / 0.18215)[0].permute(1, 0, 2, 3))
    expected = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    pipeline = vidsynth.load(str(reference["folder"]), device="cpu", dtype="float32")
    video = pipeline(prompt, seed=seed, frames=frames, height=64, width=64, steps=steps, guidance=9.0, progress=False)
    assert np.abs(video.frames / 255 - expected).max() <= 1 / 255
    assert video.frames.std() > 5
