"""The error sampling raises, in process or through a server."""

from __future__ import annotations

from openrlaif.errors import OpenRLAIFError


class GenerationError(OpenRLAIFError):
    """Sampling could not be done (a prompt too long for the model, an unreachable server, ...)."""
