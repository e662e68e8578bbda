"""Evaluation plugin: perplexity, base vs adapter, task metrics, serving benchmark and cost reports."""
