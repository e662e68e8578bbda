"""Training plugin: datasets, LoRA/QLoRA/DoRA fine-tuning with PEFT, tracking, publishing adapters."""
