"""The full-size ms-1.7b configuration with random weights: ModelScope's own classes build it, vidsynth converts every
component, the converted UNet matches ModelScope's, and the whole pipeline runs one denoising step with every
full-size layer (bfloat16 on CPUs with native bf16, else float32). 4 frames of 128 x 128 rather than the native 16 of
256 x 256: the same code in a sixteenth of the time (a native step and its decoding take about 160 s in float32 on
a 2-core CPU, BENCHMARKS.md); the native size, longer videos and larger ones run in benchmarks/."""

import gc

import torch

from conftest import randomize
from reference_code import modelscope_module, open_clip_transformer
from vidsynth.devices import resolve_dtype
from vidsynth.loading import Components
from vidsynth.modelscope_format import (MS_1_7B, convert_unet_state, load_state, openclip_tokenizer, text_encoder_from_state,
                                        unet_from_config, vae_from_state)
from vidsynth.pipeline import Pipeline
from vidsynth.request import ModelDefaults

SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def test_full_size_model_converts_matches_and_runs_a_step():
    torch.manual_seed(0)
    cfg = MS_1_7B
    with torch.device("meta"):  # built without initial weights, which randomize() replaces (28 s on a 2-core CPU)
        reference = modelscope_module("unet_sd").UNetSD(
            in_dim=cfg["unet_in_dim"], dim=cfg["unet_dim"], y_dim=cfg["unet_y_dim"], context_dim=cfg["unet_context_dim"],
            out_dim=cfg["unet_out_dim"], dim_mult=cfg["unet_dim_mult"], num_heads=cfg["unet_num_heads"],
            head_dim=cfg["unet_head_dim"], num_res_blocks=cfg["unet_res_blocks"], attn_scales=cfg["unet_attn_scales"],
            dropout=cfg["unet_dropout"], temporal_attention=True)
    assert sum(p.numel() for p in reference.parameters()) == 1_411_233_860
    assert not list(reference.buffers())  # every tensor it holds is a parameter, so randomize() fills them all
    randomize(reference.to_empty(device="cpu"), 0)
    with torch.device("meta"):  # no second 5.6 GB of random weights: the converted tensors are taken as they are
        unet = unet_from_config(cfg)
    load_state(unet, convert_unet_state(reference.state_dict(), unet), "UNet")
    unet.eval()

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
    text_tower = open_clip_transformer().TextTransformer(width=1024, heads=16, layers=24, output_dim=1024)
    text_encoder = text_encoder_from_state(randomize(text_tower, 2).state_dict())
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
