"""The full-size ms-1.7b configuration with random weights: ModelScope's own classes build it, vidsynth converts every
component, the converted UNet matches ModelScope's, and the whole pipeline runs one denoising step with every
full-size layer (bfloat16 on CPUs with native bf16, else float32). 4 frames of 128 x 128 rather than the native 16 of
256 x 256: the same code in a sixteenth of the time (a native step and its decoding take about 160 s in float32 on
a 2-core CPU, BENCHMARKS.md); the native size, longer videos and larger ones run in benchmarks/."""

import gc

import torch

from conftest import randomize
from reference_code import SD_VAE, modelscope_module, modelscope_unet, open_clip_transformer
from vidsynth.devices import resolve_dtype
from vidsynth.loading import Components
from vidsynth.modelscope_format import (MS_1_7B, openclip_tokenizer, text_encoder_from_state, unet_from_state,
                                        vae_from_state)
from vidsynth.pipeline import Pipeline
from vidsynth.request import ModelDefaults


def test_full_size_model_converts_matches_and_runs_a_step():
    torch.manual_seed(0)
    cfg = MS_1_7B
    with torch.device("meta"):  # built without initial weights, which randomize() replaces (28 s on a 2-core CPU)
        reference = modelscope_unet(cfg)
    assert sum(p.numel() for p in reference.parameters()) == 1_411_233_860
    assert not list(reference.buffers())  # every tensor it holds is a parameter, so randomize() fills them all
    randomize(reference.to_empty(device="cpu"), 0)
    unet = unet_from_state(cfg, reference.state_dict()).eval()

    x = torch.randn(1, 4, 2, 8, 8)
    context = torch.randn(1, 77, 1024)
    t = torch.tensor([981])
    with torch.no_grad():
        expected = reference(x, t, context)
        ours = unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.01
    assert (ours - expected).abs().max() <= 1e-3 * expected.abs().max()
    del reference, expected
    gc.collect()

    vae = vae_from_state({f"first_stage_model.{k}": v for k, v in
                          randomize(modelscope_module("autoencoder").AutoencoderKL(SD_VAE, 4), 1).state_dict().items()})
    with torch.device("meta"):  # as the UNet (20 s to initialise); its one buffer, the causal mask, is not saved
        text_tower = open_clip_transformer().TextTransformer(width=1024, heads=16, layers=24, output_dim=1024)
    text_encoder = text_encoder_from_state(randomize(text_tower.to_empty(device="cpu"), 2).state_dict())
    assert text_encoder.config.num_hidden_layers == 23
    del text_tower
    gc.collect()

    components = Components(tokenizer=openclip_tokenizer(), text_encoder=text_encoder.eval(), unet=unet, vae=vae.eval(),
                            schedule=None, defaults=ModelDefaults(), name="ms-1.7b (random weights)")
    # The dtype --dtype auto picks: bfloat16 where the CPU has it natively; emulated it takes many minutes a step.
    pipeline = Pipeline(components, torch.device("cpu"), resolve_dtype("auto", torch.device("cpu")))
    video = pipeline("A car flying in space.", frames=4, height=128, width=128, steps=1, seed=0, progress=False)
    assert video.frames.shape == (4, 128, 128, 3)
    assert video.settings["frames"] == 4 and video.settings["height"] == 128 and video.settings["guidance"] == 9.0
