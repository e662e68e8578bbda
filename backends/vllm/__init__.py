"""The vLLM engine: `engine` (the delegate, vLLM's public API in process), `config` (engine arguments planned as
`vllm serve` would)."""

from jarvis.backends.vllm.engine import jarvis_register_engines  # noqa: F401  (the plugin's hooks)
