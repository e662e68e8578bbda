"""The `openai` engine: remote OpenAI-compatible servers. `engine` (the delegate), `pool` (replica routing,
circuit breaking), `monitor` (health checks, adapter placement), `errors` (what a failure becomes for the client)."""

from jarvis.backends.upstream.engine import jarvis_register_engines  # noqa: F401  (the plugin's hooks)
