"""StepGraphs on a CPU, with a forward that keeps a cache's books as transformers' static layers do: the warm-up
runs before a capture leave the cache's next slot where it was, a step reads its inputs from its own buffers, and
a shape whose warm-up failed is warmed up again rather than run as it is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jarvis.backends.hf.step_graphs import WARM_UP_RUNS, StepGraphs


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
