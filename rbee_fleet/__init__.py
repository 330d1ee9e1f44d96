"""rbee-fleet: one private, OpenAI-compatible LLM service from the computers of a home or lab network."""

from rbee_fleet._version import __version__

__all__ = ["__version__"]
