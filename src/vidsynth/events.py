"""Progress events: the one channel through which a generation reports progress and warnings, and is cancelled.

A callback receives every `Event`; raising `vidsynth.Cancelled` from it stops the generation at that point
(the denoising loop calls it once per step, so cancellation takes effect within one step). The CLI progress bar,
the server's job worker and the notebook display are all such callbacks. An event with a `message` is a warning for
whoever asked for the video; without a callback it is issued as a Python warning instead.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional

Phase = Literal["load", "encode", "encode_video", "denoise", "decode", "write", "done"]

# Share of the overall progress bar each phase ends at; denoising dominates the wall time. `encode` is the text,
# `encode_video` a video to start from (video-to-video).
_PHASE_END = {"load": 0.02, "encode": 0.03, "encode_video": 0.04, "denoise": 0.92, "decode": 0.98, "write": 1.0,
              "done": 1.0}
_PHASE_START = {"load": 0.0, "encode": 0.02, "encode_video": 0.03, "denoise": 0.04, "decode": 0.92, "write": 0.98,
                "done": 1.0}


@dataclass(frozen=True)
class Event:
    phase: Phase
    step: int = 0  # steps done in this phase
    total: int = 0  # steps in this phase (0 when it has none)
    video: int = 0  # index of the video being made
    videos: int = 1  # videos in the request
    message: str = ""  # a warning (words the model never saw, the low-memory mode...); empty on progress events

    @property
    def progress(self) -> float:
        """Overall fraction done, 0..1, across all videos of the request."""
        start, end = _PHASE_START[self.phase], _PHASE_END[self.phase]
        within = self.step / self.total if self.total else 1.0
        per_video = start + (end - start) * within
        if self.phase in ("load", "done"):
            return per_video
        return (self.video + per_video) / max(self.videos, 1)


Callback = Optional[Callable[[Event], None]]


class GenerationWarning(UserWarning):
    """An Event's warning, issued through Python's warnings when no callback takes it."""


def emit(callback: Callback, event: Event) -> None:
    if callback is not None:
        callback(event)
    elif event.message:
        warnings.warn(event.message, GenerationWarning, stacklevel=3)
