"""A progress bar that is a generation callback: a text bar in a terminal, a widget in a notebook."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from .events import Event


class ProgressBar:
    """Callback showing the denoising steps of each video (before them, the encoding of a video to start from), the
    phase in the bar's description, and the generation's warnings above the bar."""

    def __init__(self, **tqdm_options):
        self.options = {"leave": False, "dynamic_ncols": True, **tqdm_options}
        self.bar = None
        self.video = -1
        self.warnings: list[str] = []  # each warning once, however many videos (an evaluation's) repeat it

    def __call__(self, event: Event) -> None:
        if event.message:
            if event.message not in self.warnings:
                self.warnings.append(event.message)
                tqdm.write(f"vidsynth: warning: {event.message}", file=sys.stderr)
            return
        if event.phase == "encode_video":
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc="encoding the start video", unit="chunk", **self.options)
            self.bar.update(event.step - self.bar.n)
            return
        if event.phase == "denoise" and (self.bar is None or event.video != self.video):
            self.close()
            self.video = event.video
            label = f"video {event.video + 1}/{event.videos}" if event.videos > 1 else "denoising"
            self.bar = tqdm(total=event.total, desc=label, unit="step", **self.options)
        if self.bar is None:
            return
        if event.phase == "denoise":
            self.bar.update(event.step - self.bar.n)
        elif event.phase == "decode":
            self.bar.set_postfix_str(f"decoding {event.step}/{event.total}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
