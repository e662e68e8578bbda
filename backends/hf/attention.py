"""Grouped-query attention for a decode step that reads each key and value head once.

transformers' sdpa attention repeats every key/value head for the query heads that share it (`repeat_kv`)
whenever a mask is given on CUDA (torch's fused kernels take no mask with `enable_gqa`), and a static wave
always gives one: each step copies the whole attended cache, the group size times over, before reading it
again. Gemma 3 has 4 query heads per key head, so that copy is most of a small model's decode step.

With one new token per row, the query heads of one key head are that head's queries instead: query
(rows, heads, 1, d) is read as (rows, key heads, group, d), the row's mask is the same for each of them, and
torch's scaled_dot_product_attention reads the keys and values as they are. Prompts (several tokens per row),
steps without a mask and everything this does not cover go to transformers' own sdpa attention unchanged.

Registered with transformers' AttentionInterface (and sdpa's mask under the same name), so a model loaded
with `attn_implementation=grouped_sdpa()` runs it in every attention layer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

NAME = "jarvis_grouped_sdpa"


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, length, dim = query.shape
    if (length != 1 or groups == 1 or attention_mask is None or attention_mask.shape[1] != 1 or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    grouped = query.reshape(rows, heads // groups, groups, dim)
    mask = attention_mask[:, :, :, :key.shape[-2]].expand(rows, 1, groups, -1)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


@functools.cache
def grouped_sdpa() -> str:
    """Register the attention (and sdpa's masks under its name) with transformers; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
