"""Convolutions rewritten: temporal ones as 2-D convolutions, and on the CPU in Winograd's algorithm (the UNet's, and
the VAE decoder's 3x3 ones).

Temporal (3, 1, 1) convolutions run as (3, 1) 2-D convolutions over a (batch, channels, frames, pixels) view: on the
CPU PyTorch runs 3-D convolutions in a generic kernel, 1.1-1.4x slower than oneDNN's 2-D one; in a UNet compiled for
CUDA, inductor keeps the activations channels-last only around 2-D convolutions (the pipeline decides where each
applies: `convolution_rewrites`).

In float32 both those and the 3x3 convolutions run in Winograd's minimal filtering algorithm, F(4, 3) along every
3-tap axis (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): 4 outputs from a 6-sample
tile in 6 multiplications rather than 12, so a 3x3 convolution takes 36 multiplications per 4x4 outputs instead of
144 and a temporal one 6 per 4 frames instead of 12. The way into that domain is one strided convolution, the
multiplications are one batched matrix product and the way back a small matrix product. PyTorch computes these
convolutions directly on the CPU (oneDNN's Winograd kernels need AVX-512 and PyTorch does not select them), hence
this code. The results differ from direct convolution by rounding only (~1e-5 relative); half precision, inputs
smaller than a tile and layers narrower than 256 channels (the shipped model's) take the direct path.

Both are class swaps for the length of a block; the weights stay where they are, shared with the original layers.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

# F(4, 3) with interpolation points 0, 1, -1, 2, -2 and infinity: the input, filter and output transforms.
F_4_3 = (
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
     [0, 4, 0, -5, 0, 1]],
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6],
     [0, 0, 1]],
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
)
ONE_TAP = ([[1]], [[1]], [[1]])  # an axis the kernel does not span: each output is its own tile
TILE = {3: 4, 1: 1}  # outputs per tile along an axis, by kernel taps along it
WINOGRAD_MIN_CHANNELS = 256
# At the default video no layer's tiles exceed ~290 MB, so it runs in one pass; long videos' layers run in several.
TILES_BUDGET_BYTES = 512 * 2**20


@functools.cache
def _transforms(taps: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The input, filter and output transforms of both axes at once: each the Kronecker product of the axes' own."""
    axes = [F_4_3 if count == 3 else ONE_TAP for count in taps]

    def both_axes(which: int) -> torch.Tensor:
        matrices = (torch.tensor(axis[which], dtype=torch.float64) for axis in axes)
        return torch.kron(*matrices).to(dtype=dtype, device=device)
    return tuple(both_axes(which) for which in range(3))


def winograd_conv2d(input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """`F.conv2d(input, weight, bias, padding=same)` for a (3, 3), (3, 1) or (1, 3) kernel, in Winograd's F(4, 3).
    For inference (no autograd): the tiles are written straight into a contiguous output, a few images at a time so
    that the transformed tiles (2.25x the images' size, held twice) stay under TILES_BUDGET_BYTES."""
    taps = tuple(weight.shape[2:])
    input_transform, filter_transform, output_transform = _transforms(taps, input.dtype, input.device)
    batch, channels, height, width = input.shape
    elements = input_transform.shape[0]
    tile_h, tile_w = (TILE[t] for t in taps)
    rows, cols = -(-height // tile_h), -(-width // tile_w)
    # Zeros on the far sides make whole tiles; the convolution below pads the near sides itself.
    if rows * tile_h > height or cols * tile_w > width:
        input = F.pad(input, (0, cols * tile_w - width, 0, rows * tile_h - height))
    transformed_weight = torch.mm(filter_transform, weight.reshape(-1, taps[0] * taps[1]).T)
    output = input.new_empty(batch, weight.shape[0], rows * tile_h, cols * tile_w)
    images_per_pass = max(1, TILES_BUDGET_BYTES // (elements * channels * rows * cols * input.element_size()))
    for first in range(0, batch, images_per_pass):
        images = slice(first, first + images_per_pass)
        _tiles_into(output[images], input[images], transformed_weight, bias, taps, input_transform, output_transform)
    return output[:, :, :height, :width]


def _tiles_into(output: torch.Tensor, input: torch.Tensor, transformed_weight: torch.Tensor, bias, taps,
                input_transform: torch.Tensor, output_transform: torch.Tensor) -> None:
    """Winograd's convolution of whole-tile `input` images, written into `output` (contiguous, the same images)."""
    batch, channels, height, width = input.shape
    out_channels, elements = output.shape[1], input_transform.shape[0]
    (tile_h, tile_w), (span_h, span_w) = (TILE[t] for t in taps), (TILE[t] + t - 1 for t in taps)
    rows, cols = height // tile_h, width // tile_w
    # Gathering the overlapping tiles and transforming them is one strided convolution of every channel alone with
    # the input transform's rows as kernels: 3-4x faster than copying the tiles out, whose innermost stride is a tile.
    tiles = F.conv2d(input.reshape(batch * channels, 1, height, width),
                     input_transform.view(elements, 1, span_h, span_w), stride=(tile_h, tile_w),
                     padding=(taps[0] // 2, taps[1] // 2))
    # (tile element, channel, tile): the products are then one batched matrix product
    tiles = tiles.view(batch, channels, elements, rows * cols).permute(2, 1, 0, 3).reshape(elements, channels, -1)
    products = torch.bmm(transformed_weight.view(elements, out_channels, channels), tiles).view(elements, -1)
    del tiles  # before the way back, which makes copies of its own

    # Back from the transform domain, ordered so that the copy into the output reads runs of adjacent pixels: rows of
    # tiles where a tile is one pixel wide (temporal), each tile's own outputs otherwise (1.4-1.8x faster there).
    if tile_w == 1:
        out_tiles = (output_transform @ products).view(tile_h, tile_w, out_channels, batch, rows, cols)
        out_tiles = out_tiles.permute(3, 2, 4, 0, 5, 1)
    else:
        out_tiles = (products.T @ output_transform.T).view(out_channels, batch, rows, cols, tile_h, tile_w)
        out_tiles = out_tiles.permute(1, 0, 2, 4, 3, 5)
    in_place = output.view(batch, out_channels, rows, tile_h, cols, tile_w)
    if bias is None:
        in_place.copy_(out_tiles)
    else:
        torch.add(out_tiles, bias.view(1, -1, 1, 1, 1, 1), out=in_place)


def winograd_pays(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Only in float32 (the transforms would amplify half precision's rounding), with at least one whole tile along
    each 3-tap axis (on 2x2 inputs the padded tiles made it 2x slower) and wide enough layers: the transforms cost in
    proportion to the channels, the products saved to their square (below 256 channels it was slower here, 5x at 32)."""
    taps = weight.shape[2:]
    return (input.dtype == torch.float32 and min(weight.shape[:2]) >= WINOGRAD_MIN_CHANNELS
            and all(size >= TILE[t] for size, t in zip(input.shape[2:], taps)))


class Winograd3x3(torch.nn.Conv2d):
    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if not winograd_pays(input, weight):
            return super()._conv_forward(input, weight, bias)
        return winograd_conv2d(input, weight, bias)


class TemporalConvAs2d(torch.nn.Conv3d):
    """A (3, 1, 1) convolution over frames as a (3, 1) 2-D one over a (batch, channels, frames, pixels) view."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        batch, channels, frames, height, width = input.shape
        out = self.conv2d(input.reshape(batch, channels, frames, height * width), weight.squeeze(-1), bias)
        return out.unflatten(-1, (height, width))

    def conv2d(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return F.conv2d(input, weight, bias, padding=(1, 0))


class WinogradTemporal(TemporalConvAs2d):
    def conv2d(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if not winograd_pays(input, weight):
            return super().conv2d(input, weight, bias)
        return winograd_conv2d(input, weight, bias)


def is_temporal(conv: torch.nn.Module) -> bool:
    """A Conv3d that mixes 3 frames only: (3, 1, 1) kernel, unit stride and dilation, 'same' zero padding."""
    return (type(conv) is torch.nn.Conv3d and conv.kernel_size == (3, 1, 1) and conv.stride == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and tuple(conv.padding) == (1, 0, 0))


def is_3x3(conv: torch.nn.Module) -> bool:
    """A plain 3x3 Conv2d with unit stride and 'same' zero padding."""
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and tuple(conv.padding) == (1, 1))


@contextlib.contextmanager
def rewritten_convolutions(model: torch.nn.Module, winograd: bool = True):
    """Within the block, the model's temporal convolutions run as 2-D ones and, with `winograd`, they and its 3x3
    convolutions run in Winograd's algorithm (float32 inputs of at least a tile)."""
    def fast_class(module):
        if is_temporal(module):
            return WinogradTemporal if winograd else TemporalConvAs2d
        return Winograd3x3 if winograd and is_3x3(module) else None

    swapped = [(module, fast_class(module)) for module in model.modules() if fast_class(module)]
    originals = [type(module) for module, _ in swapped]
    for module, fast in swapped:
        module.__class__ = fast
    try:
        yield
    finally:
        for (module, _), original in zip(swapped, originals):
            module.__class__ = original
