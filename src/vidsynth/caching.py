"""Reuse of deep UNet features across denoising steps (the DeepCache method), for the fast preset.

Adjacent denoising steps change the UNet's deep features little. Every `interval` steps the UNet runs in full and
the input of its last up block (the deep features) is kept; on the steps between, only the outermost levels run:
the time embedding, conv_in, the first down block (for its skip connections), the last up block fed the kept
features, and the output layers. diffusers' own forward does the full steps; the shallow path is written here
because no library offers it for UNet3DConditionModel. `interval=1` is the plain path.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import UNet3DConditionModel


def noise_prediction(unet) -> Callable[..., torch.Tensor]:
    """The UNet (or a compiled one) as `forward(sample, timestep, context) -> noise`."""
    return lambda sample, timestep, context: unet(sample, timestep, encoder_hidden_states=context).sample


class DeepFeatureCache:
    def __init__(self, unet: UNet3DConditionModel, interval: int, plain_forward=None):
        """`plain_forward(sample, timestep, context) -> noise` (default: the UNet's own forward; or a compiled or
        graphed one) runs the steps when caching is off."""
        self.unet, self.interval = unet, interval
        self.plain_forward = plain_forward if plain_forward is not None else noise_prediction(unet)
        self.deep: Optional[torch.Tensor] = None
        self.step = 0

    def __call__(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        if self.interval <= 1:
            return self.plain_forward(sample, timestep, context)
        full = self.deep is None or self.step % self.interval == 0
        self.step += 1
        if full:
            return self.run_full(sample, timestep, context)
        deep = self.deep
        if deep.shape[0] != sample.shape[0] * sample.shape[2]:
            # Guidance stopped since the features were kept: keep the conditional half (the batch is [uncond, cond]).
            deep = deep.chunk(2)[1]
        return self.run_shallow(sample, timestep, context, deep)

    def run_full(self, sample, timestep, context) -> torch.Tensor:
        last_up = self.unet.up_blocks[-1]

        def keep(module, args, kwargs):
            self.deep = kwargs["hidden_states"]

        handle = last_up.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=context).sample
        finally:
            handle.remove()

    def run_shallow(self, sample, timestep, context, deep) -> torch.Tensor:
        unet = self.unet
        batch, _, frames = sample.shape[:3]
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        emb = emb.repeat_interleave(frames, dim=0)
        context = context.repeat_interleave(frames, dim=0)

        hidden = sample.permute(0, 2, 1, 3, 4).reshape((batch * frames, -1) + sample.shape[3:])
        hidden = unet.conv_in(hidden)
        hidden = unet.transformer_in(hidden, num_frames=frames, return_dict=False)[0]
        skips = (hidden,)
        first_down = unet.down_blocks[0]
        if getattr(first_down, "has_cross_attention", False):
            _, res = first_down(hidden_states=hidden, temb=emb, encoder_hidden_states=context, num_frames=frames)
        else:
            _, res = first_down(hidden_states=hidden, temb=emb, num_frames=frames)
        skips += res

        last_up = unet.up_blocks[-1]
        skips = skips[:len(last_up.resnets)]
        if getattr(last_up, "has_cross_attention", False):
            hidden = last_up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=context,
                             num_frames=frames)
        else:
            hidden = last_up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, num_frames=frames)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        hidden = unet.conv_out(hidden)
        return hidden[None].reshape((-1, frames) + hidden.shape[1:]).permute(0, 2, 1, 3, 4)
