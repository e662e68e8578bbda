"""Model tooling that engines, training and evaluation share: `convert` (GGUF → transformers folder),
`lora_merge` (a PEFT adapter merged into its base), `grammars` (output constraints as xgrammar grammars),
`folders` (transformers model folders and the ids they are served as), `devices` (JARVIS_DEVICE / JARVIS_DTYPE
for torch)."""
