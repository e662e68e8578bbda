"""The llama.cpp engine: `engine` (the delegate), `grammar` (constrained sampling), `lora` (PEFT → GGUF adapters)."""

from jarvis.backends.llama_cpp.engine import jarvis_register_engines  # noqa: F401  (the plugin's hooks)
