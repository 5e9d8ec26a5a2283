"""Fast paths that must not change the result: the prompt's keys and values once per video."""

import torch
from diffusers.models.attention_processor import Attention

from conftest import randomize, tiny_unet
from vidsynth.attention import text_attention_per_video


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
