"""vidsynth: text-to-video with ModelScope-architecture models, from a laptop CPU to a GPU server."""

__version__ = "0.1.0"

from .errors import (Cancelled, InputError, ModelError, ModelUnavailableError, NumericalError, OutOfMemoryError,
                     OutputError, RequestError, VidsynthError, WriteError)
from .events import Event, GenerationWarning
from .request import GenerationRequest, ModelDefaults
from .video import Video, Videos, read_frames, read_settings

__all__ = [
    "Cancelled", "Event", "GenerationRequest", "GenerationWarning", "InputError", "ModelDefaults", "ModelError",
    "ModelUnavailableError", "NumericalError", "OutOfMemoryError", "OutputError", "Pipeline", "RequestError", "Video",
    "Videos", "VidsynthError", "WriteError", "load", "read_frames", "read_settings", "__version__",
]


def __getattr__(name: str):
    # The pipeline imports torch, diffusers and transformers, seconds of work: only once it is used, so that the
    # command line's --help and `vidsynth info`, and code that only builds requests, answer without them.
    if name in ("Pipeline", "load"):
        from . import pipeline
        globals()[name] = value = getattr(pipeline, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
