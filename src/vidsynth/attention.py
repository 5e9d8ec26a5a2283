"""Cross-attention on the prompt once per video rather than once per frame.

UNet3DConditionModel repeats the prompt's hidden states for every frame, so each cross-attention layer projects the
same 77 tokens to keys and values `frames` times and holds `frames` copies. Since every query attends to the same
keys, the frames can be folded into the query sequence instead: one projection per video, the same arithmetic per
query. diffusers has no processor for this, hence this one; other attention (self, temporal, masked) is left to
diffusers' own processor.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class PerVideoTextAttention:
    def __init__(self, frames: int):
        self.frames = frames
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs) -> torch.Tensor:
        rows = hidden_states.shape[0]
        plain = (attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross and attn.norm_q is None
                 and attn.norm_k is None and not attn.residual_connection and attn.rescale_output_factor == 1.0)
        if (encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3 or not plain
                or rows % self.frames or encoder_hidden_states.shape[0] != rows):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        videos, tokens = rows // self.frames, hidden_states.shape[1]
        context = encoder_hidden_states[::self.frames]  # the rows are video-major: one copy per frame
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.reshape(videos, self.frames * tokens, heads, head_dim).transpose(1, 2)
        key = key.view(videos, -1, heads, head_dim).transpose(1, 2)
        value = value.view(videos, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(rows, tokens, heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def text_attention_per_video(unet: torch.nn.Module, frames: int):
    """Within the block, the UNet's cross-attention layers project the prompt once per video of `frames` frames."""
    layers = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    previous = [layer.processor for layer in layers]
    processor = PerVideoTextAttention(frames)
    for layer in layers:
        layer.processor = processor
    try:
        yield
    finally:
        for layer, original in zip(layers, previous):
            layer.processor = original
