"""The exceptions vidsynth raises on purpose. The CLI maps them to exit codes, the server to HTTP statuses."""


class VidsynthError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class RequestError(VidsynthError, ValueError):
    """A generation setting is invalid. `field` names it (as in GenerationRequest)."""

    exit_code = 2

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UsageError(VidsynthError):
    """A command's option is invalid or contradicts another (the generation request's fields raise RequestError)."""

    exit_code = 2


class ModelError(VidsynthError):
    """A model cannot be found, resolved, or loaded (missing files, wrong layout, corrupt or unsafe weights)."""

    exit_code = 2


class ModelUnavailableError(ModelError):
    """A hub model is not cached and the hub cannot be reached."""

    exit_code = 1


class OutputError(VidsynthError):
    """The output path is unusable (unknown extension, missing or read-only directory)."""

    exit_code = 2


class InputError(VidsynthError):
    """An input cannot be read: a video to start from (missing, not a video, no frames), a training dataset."""

    exit_code = 2


class NumericalError(VidsynthError):
    """NaN or inf appeared in the latents or decoded frames; the message names a dtype to retry with."""


class OutOfMemoryError(VidsynthError):
    """The device ran out of memory making a video; the message names the settings that need less."""


class Cancelled(VidsynthError):
    """Raised from a progress callback to stop a generation; nothing is written."""

    exit_code = 130
