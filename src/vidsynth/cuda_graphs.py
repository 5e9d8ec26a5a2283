"""The UNet's forward replayed as a CUDA graph: every kernel of a step launched at once, without compiling.

An eager ms-1.7b forward launches thousands of kernels, most of them small at the default video (the deep levels
work on 8x8 and 4x4 latents), so the GPU idles between them while Python and PyTorch's dispatcher queue the next.
A graph captured from one eager forward replays those same kernels with one launch. torch.compile's
`reduce-overhead` mode does this too, after minutes of compiling; capturing costs two forwards.

A graph reads its inputs from, and writes its output to, fixed buffers, and holds the addresses of the weights and
of its own memory pool: it is valid only while the weights stay where they are (no offloading) and the modules are
not swapped. The pipeline keeps both true for as long as it uses a graph.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .devices import is_out_of_memory

MAX_GRAPHS = 2  # guided and unguided steps of one video shape; more shapes would each hold a forward's activations


@dataclass
class CapturedStep:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class CudaGraphedForward:
    """`forward(sample, timestep, context) -> tensor`, replayed from a graph captured once per input shape.

    Falls back to calling `forward` eagerly, with a warning, if capturing fails (an operator that synchronises with
    the CPU cannot be captured); not when it ran out of memory, which a smaller video would not, so that error is the
    caller's and later shapes are captured as before."""

    def __init__(self, forward: Callable[..., torch.Tensor]):
        self.forward = forward
        self.steps: OrderedDict[tuple, CapturedStep] = OrderedDict()
        self.pool = None
        self.failed = False

    def __call__(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device)
        if self.failed:
            return self.forward(sample, timestep, context)
        inputs = (sample, timestep, context)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        step = self.steps.get(key)
        if step is None:
            try:
                step = self.capture(inputs)
            except RuntimeError as error:
                if is_out_of_memory(error):
                    raise
                warnings.warn(f"the UNet could not be captured as a CUDA graph, running it eagerly: {error}")
                self.failed, self.steps = True, OrderedDict()
                return self.forward(*inputs)
            self.steps[key] = step
            if len(self.steps) > MAX_GRAPHS:
                self.steps.popitem(last=False)
        self.steps.move_to_end(key)
        for buffer, value in zip(step.inputs, inputs):
            buffer.copy_(value)
        step.graph.replay()
        return step.output.clone()  # the next replay overwrites the output buffer

    def capture(self, inputs: tuple[torch.Tensor, ...]) -> CapturedStep:
        buffers = tuple(x.clone() for x in inputs)
        # A warm-up off the capturing stream first, as PyTorch requires: lazy initialisation (cuBLAS handles,
        # attention backends' workspaces) must not happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # graphs of one pipeline share memory: they never run at once
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.forward(*buffers)
        return CapturedStep(graph, buffers, output)
