"""Embeddings on transformers: padded forwards of the base decoder, mean-pooled under the attention mask.

The inputs are sorted by length and cut into groups of at most `max_tokens` padded tokens (little padding,
bounded memory); each group is one right-padded forward of the model's decoder (`get_decoder()`: the
transformer stack with its final norm, no LM head, no KV cache), its last hidden state averaged over each
row's real tokens and L2-normalised in float32. Every forward holds the model handle's lock, the one the
wave scheduler holds for each of its steps, so embedding forwards interleave with decode steps and never run
inside one (nor while an adapter is being loaded); loaded LoRA adapters are switched off for the forward,
since embeddings come from the base model.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

#: Padded tokens per forward (rows × longest row): bounds activation memory and the time the lock is held.
MAX_TOKENS_PER_FORWARD = 8192


def length_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Input indices sorted by length and grouped so that rows × longest row ≤ max_tokens (one row at least)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > max_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's real tokens (`mask` 1), then unit L2 length; float32 [rows, hidden]."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return torch.nn.functional.normalize(summed / weights.sum(dim=1).clamp(min=1.0), dim=-1)


def embed_token_ids(handle: Any, token_ids: list[list[int]],
                    max_tokens: int = MAX_TOKENS_PER_FORWARD) -> list[list[float]]:
    """The unit vectors of `token_ids`, in input order; blocks (run it in a worker thread)."""
    out: list[list[float]] = [[] for _ in token_ids]
    pad = handle.tokenizer.pad_token_id or 0
    for group in length_groups([len(t) for t in token_ids], max_tokens):
        width = max(len(token_ids[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, index in enumerate(group):
            tokens = token_ids[index]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        ids, mask = ids.to(handle.device), mask.to(handle.device)
        with handle.lock, torch.inference_mode():
            model = handle.model
            base_only = model.disable_adapter() if handle.has_adapters else contextlib.nullcontext()
            with base_only:
                decoder = (model.get_base_model() if handle.has_adapters else model).get_decoder()
                handle.stats.forward_passes += 1
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            vectors = mean_pool(hidden, mask).cpu().tolist()
        for row, index in enumerate(group):
            out[index] = vectors[row]
    return out
