"""The exceptions vidsynth raises on purpose. The CLI maps them to exit codes, the server to HTTP statuses."""


class VidsynthError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `code`, what a server's failed job reports."""

    exit_code = 1
    code = "error"


class RequestError(VidsynthError, ValueError):
    """A generation setting is invalid. `field` names it (as in GenerationRequest)."""

    exit_code = 2
    code = "invalid_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UsageError(VidsynthError):
    """A command's option is invalid or contradicts another (the generation request's fields raise RequestError)."""

    exit_code = 2
    code = "usage_error"


class ModelError(VidsynthError):
    """A model cannot be found, resolved, or loaded (missing files, wrong layout, corrupt or unsafe weights)."""

    exit_code = 2
    code = "model_error"


class ModelUnavailableError(ModelError):
    """A hub model is not cached and the hub cannot be reached."""

    exit_code = 1
    code = "model_unavailable"


class OutputError(VidsynthError):
    """The output path is unusable (unknown extension, missing or read-only directory)."""

    exit_code = 2
    code = "output_error"


class WriteError(OutputError):
    """A file could not be written (a full disk, an I/O error); nothing of it is left. `reason` is the system's."""

    exit_code = 1
    code = "write_error"

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class InputError(VidsynthError):
    """An input cannot be read: a video to start from (missing, not a video, no frames), a training dataset."""

    exit_code = 2
    code = "invalid_input"


class NumericalError(VidsynthError):
    """NaN or inf appeared in the latents or decoded frames; the message names a dtype to retry with."""

    code = "numerical_error"


class OutOfMemoryError(VidsynthError):
    """The device ran out of memory making a video; the message names the settings that need less."""

    code = "out_of_memory"


class Cancelled(VidsynthError):
    """Raised from a progress callback to stop a generation; nothing is written."""

    exit_code = 130
    code = "canceled"
