"""Errors a user can cause. The CLI prints them as one line, never as a traceback."""


class OpenRLAIFError(Exception):
    """Base class: the message is complete and says what to fix."""


class InputError(OpenRLAIFError):
    """Bad input data, reported as `file:line: what is wrong`."""

    def __init__(self, path: str, line: int | str, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        super().__init__(f"{path}:{line}: {message}")


class ConfigError(OpenRLAIFError):
    """A bad config file or setting."""


class JudgeError(OpenRLAIFError):
    """A judge could not answer (unreachable server, unusable model output, ...)."""


class OutputBusyError(OpenRLAIFError):
    """An output (file or folder) that another running job is writing."""


class DiskFullError(OpenRLAIFError):
    """No space left (or over quota) while writing `path`: what was saved before is kept."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        super().__init__(
            f"{path}: the disk is full (no space left on device); what was saved before is kept: "
            "free some space and run the same command again to go on from there"
        )


class GenerationError(OpenRLAIFError):
    """Sampling could not be done (a prompt too long for the model, an unreachable server, ...)."""
