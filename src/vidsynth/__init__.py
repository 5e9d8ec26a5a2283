"""vidsynth: text-to-video with ModelScope-architecture models, from a laptop CPU to a GPU server."""

__version__ = "0.1.0"

from .errors import (Cancelled, InputError, ModelError, ModelUnavailableError, NumericalError, OutputError,
                     RequestError, VidsynthError)
from .events import Event
from .pipeline import Pipeline, load
from .request import GenerationRequest, ModelDefaults
from .video import Video, read_frames, read_settings

__all__ = [
    "Cancelled", "Event", "GenerationRequest", "InputError", "ModelDefaults", "ModelError", "ModelUnavailableError",
    "NumericalError", "OutputError", "Pipeline", "RequestError", "Video", "VidsynthError", "load", "read_frames",
    "read_settings", "__version__",
]
