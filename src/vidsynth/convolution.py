"""Convolutions on the CPU with weights packed once for oneDNN.

PyTorch's eager convolution on the CPU converts each weight into oneDNN's blocked layout on every call, and feeds
the UNet's (3, 1, 1) temporal convolutions on NCDHW inputs to a slower kernel. Packing every weight once per video
and letting the activations flow channels-last (packed convolutions return them so) runs the ms-1.7b UNet step
1.2x faster on a 2-core AVX2 CPU (BENCHMARKS.md). Inductor's freezing does the same for a compiled model; diffusers
has no eager switch for it, hence this class swap. The packed copies exist only within the block.
"""

from __future__ import annotations

import contextlib
import platform

import torch

from .devices import cpu_supports_bf16


class PackedConvolution:
    """Mixed into Conv2d/Conv3d: the weight is packed for the first input shape seen and again if it changes."""

    packed_weight = None
    packed_for = None

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if self.packed_for != input.shape:
            self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(input.shape))
            self.packed_for = input.shape
        return torch.ops.mkldnn._convolution_pointwise(input, self.packed_weight, bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


class PackedConv2d(PackedConvolution, torch.nn.Conv2d):
    pass


class PackedConv3d(PackedConvolution, torch.nn.Conv3d):
    pass


PACKED = {torch.nn.Conv2d: PackedConv2d, torch.nn.Conv3d: PackedConv3d}


def can_pack(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs weights of `dtype` (x86-64 only: other CPUs' oneDNN builds are untested)."""
    if not torch.backends.mkldnn.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_supports_bf16())


def packable(conv: torch.nn.Module) -> bool:
    return (type(conv) in PACKED and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.device.type == "cpu" and can_pack(conv.weight.dtype))


@contextlib.contextmanager
def packed_convolutions(model: torch.nn.Module):
    """Within the block, the model's CPU convolutions run with packed weights (the same results up to rounding)."""
    layers = [(module, type(module)) for module in model.modules() if packable(module)]
    for layer, plain in layers:
        layer.__class__ = PACKED[plain]
    try:
        yield
    finally:
        for layer, plain in layers:
            layer.__class__ = plain
            layer.__dict__.pop("packed_weight", None)
            layer.__dict__.pop("packed_for", None)
