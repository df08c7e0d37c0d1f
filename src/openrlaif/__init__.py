"""openrlaif: align language models with AI feedback (RLAIF), and measure what happened."""

__version__ = "0.1.0"
