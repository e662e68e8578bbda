"""The hf engine's grouped decode attention gives transformers' sdpa attention's output: a decode step's query
heads read as the queries of the key head they share, under each row's mask; anything else is sdpa's own."""

from __future__ import annotations

import types

import pytest
import torch

from jarvis.backends.hf.attention import grouped_decode_attention, grouped_sdpa


def inputs(rows: int, length: int, kv: int = 256):
    g = torch.Generator().manual_seed(rows * 1000 + length)
    query = torch.randn(rows, length, 4, 64, generator=g).transpose(1, 2)  # (rows, heads, length, dim), as a view
    key, value = (torch.randn(rows, 1, kv, 64, generator=g) for _ in range(2))
    visible = torch.rand(rows, 1, length, kv, generator=g) > 0.4
    visible[..., -1] = True  # every query sees a slot
    return query, key, value, visible


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_a_decode_step_with_a_mask_equals_sdpa(mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True)
    query, key, value, visible = inputs(rows=6, length=1)
    mask = visible if mask_kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.125)
    assert got.shape == expected.shape == (6, 1, 4, 64)
    torch.testing.assert_close(got, expected)


def test_prompts_and_unmasked_steps_are_sdpa_itself():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True)
    for length, masked in ((7, True), (1, False)):
        query, key, value, visible = inputs(rows=3, length=length)
        mask = visible if masked else None
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
        got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.125)
        assert torch.equal(got, expected)


def test_registered_with_transformers_under_one_name():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = grouped_sdpa()
    assert name == grouped_sdpa()
    assert AttentionInterface()[name] is grouped_decode_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is sdpa_mask
