"""StepGraphs on a CPU, with a forward that keeps a cache's books as transformers' static layers do: the warm-up
runs before a capture leave the cache's next slot where it was, a step reads its inputs from its own buffers, and
a shape whose warm-up failed is warmed up again rather than run as it is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jarvis.backends.hf.step_graphs import MIN_PREFILL_WIDTH, WARM_UP_RUNS, PrefillGraphs, StepGraphs


class Layer:
    is_initialized = True

    def __init__(self) -> None:
        self.cumulative_length = torch.tensor([5])


class Forward:
    """Moves every layer's next slot on by one, as a decode step does, and returns logits that show its inputs."""

    def __init__(self, cache: SimpleNamespace, fail: int = 0) -> None:
        self.cache, self.fail, self.calls = cache, fail, 0

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, **_):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("compile failed")
        assert past_key_values is self.cache
        for layer in past_key_values.layers:
            layer.cumulative_length.add_(1)
        logits = (input_ids * 100 + position_ids * 10 + attention_mask.sum(-1, keepdim=True)).float()
        return SimpleNamespace(logits=logits.unsqueeze(-1))


def test_warm_up_runs_leave_the_next_slot_and_steps_read_their_inputs():
    cache = SimpleNamespace(layers=[Layer(), Layer()])
    forward = Forward(cache)
    graphs = StepGraphs(forward, cache)
    mask = torch.zeros((2, 16), dtype=torch.long)
    mask[:, :3] = 1
    positions = torch.tensor([[4], [7]])
    first = graphs.step(torch.tensor([1, 2]), mask, positions, window=8)
    assert first[:, 0].tolist() == [143.0, 273.0]
    assert forward.calls == WARM_UP_RUNS + 1
    assert [int(layer.cumulative_length) for layer in cache.layers] == [6, 6]  # one step's move, not three
    mask[:, 3] = 1
    second = graphs.step(torch.tensor([3, 4]), mask, positions + 1, window=8)
    assert second[:, 0].tolist() == [354.0, 484.0]
    assert forward.calls == WARM_UP_RUNS + 2 and sorted(graphs._shapes) == [(2, 8)]
    assert [int(layer.cumulative_length) for layer in cache.layers] == [7, 7]


def test_a_failed_warm_up_is_tried_again():
    cache = SimpleNamespace(layers=[Layer()])
    forward = Forward(cache, fail=1)
    graphs = StepGraphs(forward, cache)
    mask = torch.ones((1, 8), dtype=torch.long)
    with pytest.raises(RuntimeError, match="compile failed"):
        graphs.step(torch.tensor([1]), mask, torch.tensor([[0]]), window=4)
    assert not graphs._shapes
    logits = graphs.step(torch.tensor([1]), mask, torch.tensor([[0]]), window=4)
    assert logits[:, 0].tolist() == [104.0] and forward.calls == 1 + WARM_UP_RUNS + 1


@pytest.fixture(scope="module")
def tiny_gemma():
    """A random two-layer Gemma 3 (one sliding-window layer of 8 tokens, one global), small enough for the fast
    subset."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    return Gemma3ForCausalLM(config).eval()


def eager(model, ids, mask, positions):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]


def left_padded(prompts: list[list[int]]):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_a_prefill_padded_to_its_graphs_shape_answers_as_the_eager_one(tiny_gemma):
    """Three prompts (the longest past the sliding window) in a graph of 4 rows × 32 tokens: the same last logits,
    and the same keys and values in the last slots, as the eager prefill at their own width; the stand-in row
    stays finite. A prompt wider than the graphs' token limit runs eager (None)."""
    graphs = PrefillGraphs(tiny_gemma.forward, tiny_gemma.config, torch.float32)
    prompts = [[5, 6, 7], list(range(10, 23)), [40, 41, 42, 43, 44]]
    ids, mask, positions = left_padded(prompts)
    with torch.no_grad():
        logits, layers = graphs.prefill(ids, mask, positions)
        expected, expected_layers = eager(tiny_gemma, ids, mask, positions)
    assert sorted(graphs._shapes) == [(4, MIN_PREFILL_WIDTH)] and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for (keys, values), (k, v) in zip(layers, expected_layers):
        kept = min(k.shape[-2], ids.shape[1])  # the sliding layer keeps the window's last 7
        torch.testing.assert_close(keys[:, :, -kept:], k[:, :, -kept:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[:, :, -kept:], v[:, :, -kept:], rtol=1e-4, atol=1e-5)
    assert graphs._shapes[(4, MIN_PREFILL_WIDTH)].logits.isfinite().all()  # the stand-in row's too
    assert PrefillGraphs(tiny_gemma.forward, tiny_gemma.config, torch.float32,
                         max_tokens=MIN_PREFILL_WIDTH - 1).prefill(ids, mask, positions) is None


def test_rows_over_the_token_limit_are_prefilled_in_pieces_that_answer_as_one_eager_pass(tiny_gemma):
    """Five prompts where a graph holds two rows of their width: pieces of 2, 2 and 1 rows (two shapes), whose
    joined outputs equal one eager pass over all five; a piece whose shape has no graph sends all five eager."""
    graphs = PrefillGraphs(tiny_gemma.forward, tiny_gemma.config, torch.float32, max_tokens=3 * MIN_PREFILL_WIDTH)
    prompts = [[5, 6, 7], list(range(10, 23)), [40, 41, 42, 43, 44], [9] * 20, [60, 61]]
    ids, mask, positions = left_padded(prompts)
    with torch.no_grad():
        logits, layers = graphs.prefill(ids, mask, positions)
        expected, expected_layers = eager(tiny_gemma, ids, mask, positions)
    assert sorted(graphs._shapes) == [(1, MIN_PREFILL_WIDTH), (2, MIN_PREFILL_WIDTH)] and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for (keys, values), (k, v) in zip(layers, expected_layers, strict=True):
        kept = min(k.shape[-2], ids.shape[1])
        assert keys.shape[0] == values.shape[0] == len(prompts)
        torch.testing.assert_close(keys[:, :, -kept:], k[:, :, -kept:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[:, :, -kept:], v[:, :, -kept:], rtol=1e-4, atol=1e-5)
    graphs._eager.add((1, MIN_PREFILL_WIDTH))
    assert graphs.prefill(ids, mask, positions) is None


def test_a_prefill_whose_capture_fails_runs_eager_from_then_on(tiny_gemma, monkeypatch):
    graphs = PrefillGraphs(tiny_gemma.forward, tiny_gemma.config, torch.float32)
    tries: list[int] = []
    monkeypatch.setattr(graphs, "_capture", lambda p: tries.append(1) or 1 / 0)
    ids, mask, positions = left_padded([[5, 6, 7]])
    with torch.no_grad():
        assert graphs.prefill(ids, mask, positions) is None and graphs.prefill(ids, mask, positions) is None
    assert tries == [1] and not graphs._shapes and graphs.shape(1, 3) is None
