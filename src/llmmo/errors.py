"""User-facing errors: each names the input that is wrong and how to fix it.

The CLI prints an `LlmmoError` as one line on stderr and exits with status 2; anything else is an internal
error (status 1, traceback only with `--debug`).
"""


class LlmmoError(Exception):
    """A problem with the user's input, config, data or files, with a message that says what to do."""


class ConfigError(LlmmoError):
    """An unknown key, a value of the wrong type, or a combination of settings that cannot work."""


class DataError(LlmmoError):
    """A corpus that is missing, empty, not decodable, too short, or cannot be downloaded."""


class CheckpointError(LlmmoError):
    """A checkpoint folder that is missing, incomplete, corrupt, or of another format version."""


class InteropError(LlmmoError):
    """A model or option that another library's format cannot hold exactly (or a foreign model that llmmo
    cannot), or a model that cannot be fetched; refused rather than converted approximately."""


class DivergedError(LlmmoError):
    """Training whose loss or gradient became NaN or infinite (most often a learning rate too high). `detail` says
    where; the message adds the fix of the command that trained."""

    def __init__(self, detail: str, fix: str):
        super().__init__(f"{detail}; {fix}")
        self.detail = detail
