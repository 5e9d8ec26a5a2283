"""Choosing the device and dtype a model runs in, the names of those settings, and telling a device's running out
of memory from its other failures.

torch is imported where it is used: the command line builds its options from the names here without it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

from .errors import RequestError

if TYPE_CHECKING:
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}  # name -> torch's name
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", *DTYPES)
OFFLOAD_MODES = ("none", "model", "sequential")


def cpu_supports_bf16() -> bool:
    import torch
    # oneDNN reports native bf16 only where the CPU has AVX-512 BF16 or AMX; elsewhere bf16 is emulated and slower.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_device(name: str = "auto") -> torch.device:
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise RequestError("device", f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)}")
    if base == "cuda" and not torch.cuda.is_available():
        raise RequestError("device", "CUDA was asked for but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    if base == "mps" and not torch.backends.mps.is_available():
        raise RequestError("device", "MPS was asked for but is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise RequestError("dtype", f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    dtype = getattr(torch, DTYPES[name])
    if device.type == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_supports_bf16())):
        # The shipped model denoised 14x slower in either than in float32 on an AVX2-only CPU (BENCHMARKS.md).
        warnings.warn(f"{dtype_name(dtype)} is emulated on this CPU, many times slower than float32 "
                      f'(what dtype "auto" picks here)', stacklevel=3)  # the caller of vidsynth.load
    return dtype


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a failure was an allocation the device could not make: CUDA's own error, the CPU's and MPS's
    allocators' RuntimeErrors, Python's MemoryError (NumPy's arrays); or an error raised while one of those was on its
    way out (ending a CUDA graph's capture can fail so)."""
    import torch
    signs = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory")
    return any(isinstance(cause, (torch.OutOfMemoryError, MemoryError))
               or (isinstance(cause, RuntimeError) and any(sign in str(cause) for sign in signs))
               for cause in (error, error.__context__))


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """A GPU's own memory, for messages; None for the CPU (its memory is the host's) or where unknown."""
    import torch
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "mps":
            return torch.mps.recommended_max_memory()
    except (RuntimeError, AssertionError, AttributeError):  # torch built without that backend, or an older torch
        pass
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
