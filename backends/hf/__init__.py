"""The transformers engine: `engine` (the delegate), `waves` (the batch scheduler), `sampling` (the next token of
each row), `continuous` (transformers' continuous batching)."""

from jarvis.backends.hf.engine import jarvis_register_commands, jarvis_register_engines  # noqa: F401  (the plugin's hooks)
