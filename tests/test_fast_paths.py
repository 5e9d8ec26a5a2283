"""Fast paths that must not change the result: the prompt's keys and values once per video, temporal convolutions
as 2-D ones, the compiled UNet."""

import os
import unittest.mock

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

import vidsynth
from conftest import randomize, tiny_unet
from vidsynth.attention import text_attention_per_video
from vidsynth.convolution import TemporalConvAs2d, temporal_convs_as_2d


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


def test_temporal_convolutions_as_2d_give_the_plain_result():
    unet = randomize(tiny_unet(), 6)
    sample, context = torch.randn(2, 4, 5, 16, 16), torch.randn(2, 77, 32)
    temporal = [m for m in unet.modules() if type(m) is torch.nn.Conv3d]
    assert temporal and all(m.kernel_size == (3, 1, 1) for m in temporal)
    with torch.no_grad():
        plain = unet(sample, torch.tensor(300), encoder_hidden_states=context).sample
        calls = []
        conv2d = torch.nn.functional.conv2d
        with temporal_convs_as_2d(unet):
            assert all(type(m) is TemporalConvAs2d for m in temporal)
            def counting(input, weight, *args, **kwargs):
                calls.append(tuple(weight.shape[-2:]))
                return conv2d(input, weight, *args, **kwargs)

            with unittest.mock.patch("torch.nn.functional.conv2d", counting):
                swapped = unet(sample, torch.tensor(300), encoder_hidden_states=context).sample
    assert calls.count((3, 1)) == len(temporal)  # each swapped layer really ran as a 2-D convolution
    assert all(type(m) is torch.nn.Conv3d for m in temporal)  # restored after the block
    assert torch.allclose(swapped, plain, atol=1e-5), (swapped - plain).abs().max()


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


@pytest.mark.skipif(not os.environ.get("VIDSYNTH_SLOW"), reason="compiles with inductor, minutes on 2 cores: "
                    "opt in with VIDSYNTH_SLOW=1")
def test_inductor_compiled_unet_with_frozen_weights_gives_the_plain_frames(tiny_model_dir, tiny_pipeline):
    torch._dynamo.reset()
    compiled = vidsynth.load(str(tiny_model_dir), device="cpu", dtype="float32", compile=True)
    settings = dict(frames=3, height=32, width=32, steps=3, seed=4, progress=False)
    made = compiled("a red circle", **settings).frames
    plain = tiny_pipeline("a red circle", **settings).frames
    assert np.abs(made.astype(int) - plain).max() <= 1
