"""Jarvis: an OpenAI-compatible, plugin-extensible LLM server."""

from jarvis.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
