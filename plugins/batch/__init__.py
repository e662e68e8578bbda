"""Batch plugin: the OpenAI Batch API (/v1/files, /v1/batches) and offline `jarvis batch` JSONL jobs."""
