"""Tinker's built-in losses: values and logit gradients against plain-torch references written from the
documented formulas, PPO clipping, importance sampling on-policy, CISPO defaults, and every input error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jarvis.plugins.tinker.losses import LOSSES, LossInputError, check_loss, datum_loss

VOCAB, LENGTHS = 11, (5, 7)


def make_batch(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two datums: leaf logits [N, V] and loss_fn_inputs; sampler logprobs are the trainer's plus noise."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in LENGTHS:
        logits = torch.randn(n, VOCAB, generator=g)
        tokens = torch.randint(0, VOCAB, (n,), generator=g)
        trainer = torch.log_softmax(logits, -1)[torch.arange(n), tokens]
        batch.append({"logits": logits, "target_tokens": tokens, "weights": torch.rand(n, generator=g),
                      "logprobs": trainer + 0.7 * torch.randn(n, generator=g),
                      "advantages": torch.randn(n, generator=g)})
    return batch


def via_module(name: str, config: dict[str, float], batch: list[dict[str, torch.Tensor]]):
    total, leaves = torch.zeros(()), []
    for d in batch:
        logits = d["logits"].clone().requires_grad_(True)
        leaves.append(logits)
        target_logprobs = torch.log_softmax(logits, -1).gather(1, d["target_tokens"][:, None]).squeeze(1)
        inputs = {k: d[k] for k in LOSSES[name].inputs}
        check_loss(name, inputs, config, len(d["target_tokens"]))
        total = total + datum_loss(name, target_logprobs, inputs, config).sum()
    total.backward()
    return total.detach(), [leaf.grad for leaf in leaves]


def reference(name: str, config: dict[str, float], batch: list[dict[str, torch.Tensor]]):
    """The documented formulas, written out independently of the module."""
    total, leaves = torch.zeros(()), []
    for d in batch:
        logits = d["logits"].clone().requires_grad_(True)
        leaves.append(logits)
        n = len(d["target_tokens"])
        lp = logits[torch.arange(n), d["target_tokens"]] - torch.logsumexp(logits, -1)
        s, a = d["logprobs"], d["advantages"]
        r = torch.exp(lp - s)
        if name == "cross_entropy":
            loss = -(d["weights"] * lp).sum()
        elif name == "importance_sampling":
            loss = -(r * a).sum()
        elif name == "ppo":
            low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
            clipped = torch.where(r < low, torch.full_like(r, low), torch.where(r > high, torch.full_like(r, high), r))
            loss = -torch.where(r * a <= clipped * a, r * a, clipped * a).sum()
        elif name == "cispo":
            low, high = config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 4.0)
            coefficient = torch.tensor([min(max(x, low), high) for x in r.tolist()])
            loss = -(coefficient * lp * a).sum()
        else:
            loss = -(lp * a - 0.5 * config["beta"] * (lp - s) ** 2).sum()
        total = total + loss
    total.backward()
    return total.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("name, config", [
    ("cross_entropy", {}), ("importance_sampling", {}), ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}), ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}), ("dro", {"beta": 0.05}), ("dro", {"beta": 2.0}),
])
def test_loss_and_logit_gradients_match_the_reference(name: str, config: dict[str, float]) -> None:
    batch = make_batch()
    value, grads = via_module(name, config, batch)
    want_value, want_grads = reference(name, config, batch)
    torch.testing.assert_close(value, want_value)
    for grad, want in zip(grads, want_grads):
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, want)


def test_cross_entropy_weights_default_to_one() -> None:
    lp = torch.tensor([-1.0, -2.0, -0.5])
    inputs = {"target_tokens": torch.tensor([1, 2, 3])}
    check_loss("cross_entropy", inputs, None, 3)
    torch.testing.assert_close(datum_loss("cross_entropy", lp, inputs, None), -lp)


def rl_case(ratios: list[float], advantages: list[float]):
    lp = torch.linspace(-2.0, -0.5, len(ratios)).requires_grad_(True)
    inputs = {"target_tokens": torch.arange(len(ratios)), "advantages": torch.tensor(advantages),
              "logprobs": lp.detach() - torch.tensor(ratios).log()}
    return lp, inputs


def test_ppo_clipping_zeroes_the_gradient_where_the_clipped_branch_is_taken() -> None:
    ratios, adv = [0.5, 0.5, 1.0, 1.5, 1.5, 1.1], [1.0, -1.0, 1.0, 1.0, -1.0, -1.0]
    lp, inputs = rl_case(ratios, adv)
    loss = datum_loss("ppo", lp, inputs, {}).sum()
    loss.backward()
    # below the band with A<0 and above it with A>0 take the (constant) clipped branch; the rest are unclipped
    torch.testing.assert_close(loss.detach(), torch.tensor(-(0.5 - 0.8 + 1.0 + 1.2 - 1.5 - 1.1)))
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5, 0.0, -1.0, 0.0, 1.5, 1.1]))
    lp.grad = None
    datum_loss("ppo", lp, inputs, {"clip_low_threshold": 0.4, "clip_high_threshold": 2.0}).sum().backward()
    torch.testing.assert_close(lp.grad, -torch.tensor(ratios) * torch.tensor(adv))  # wide band: nothing clipped


def test_importance_sampling_on_policy_is_the_policy_gradient() -> None:
    d = make_batch(seed=3)[0]
    logits = d["logits"].clone().requires_grad_(True)
    lp = torch.log_softmax(logits, -1).gather(1, d["target_tokens"][:, None]).squeeze(1)
    inputs = {"target_tokens": d["target_tokens"], "logprobs": lp.detach(), "advantages": d["advantages"]}
    loss = datum_loss("importance_sampling", lp, inputs, None).sum()
    loss.backward()
    torch.testing.assert_close(loss.detach(), -d["advantages"].sum())
    onehot = torch.nn.functional.one_hot(d["target_tokens"], VOCAB).float()
    torch.testing.assert_close(logits.grad, -d["advantages"][:, None] * (onehot - torch.softmax(d["logits"], -1)))


def test_cispo_default_clip_is_one_sided_and_detached() -> None:
    lp, inputs = rl_case([0.1, 1.0, 5.0], [1.0, -2.0, 1.0])
    loss = datum_loss("cispo", lp, inputs, None).sum()
    loss.backward()
    coefficient = torch.tensor([0.1, 1.0, 4.0])  # clip(ratio, 0.0, 4.0), a constant
    torch.testing.assert_close(lp.grad, -coefficient * torch.tensor([1.0, -2.0, 1.0]))
    torch.testing.assert_close(loss.detach(), -(coefficient * lp.detach() * torch.tensor([1.0, -2.0, 1.0])).sum())


def test_numpy_inputs_are_accepted() -> None:
    inputs = {"target_tokens": np.array([3, 1]), "logprobs": np.array([-1.0, -2.0], np.float32),
              "advantages": np.array([0.5, -0.5], np.float32)}
    check_loss("ppo", inputs, {"clip_low_threshold": 0.9}, 2)


def rl_inputs(**change) -> dict:
    inputs = {"target_tokens": torch.tensor([1, 2, 3, 4]), "logprobs": torch.full((4,), -1.0),
              "advantages": torch.ones(4)}
    inputs.update(change)
    return {k: v for k, v in inputs.items() if v is not None}


SUPPORTED = "supported: cross_entropy, importance_sampling, ppo, cispo, dro"


@pytest.mark.parametrize("name, inputs, config, key, message", [
    ("gspo", rl_inputs(), {}, None, f"unsupported loss_fn 'gspo'; {SUPPORTED}"),
    ("custom", rl_inputs(), {}, None, f"unsupported loss_fn 'custom'; {SUPPORTED}"),
    ("stable_reinforce", rl_inputs(), {}, None, "unsupported loss_fn 'stable_reinforce'"),
    ("ppo", rl_inputs(advantages=None), {}, "advantages", "ppo: loss_fn_inputs is missing 'advantages'"),
    ("cross_entropy", {"weights": torch.ones(4)}, {}, "target_tokens", "missing 'target_tokens'"),
    ("importance_sampling", rl_inputs(weights=torch.ones(4)), {}, "weights",
     "importance_sampling: unknown loss_fn_inputs key 'weights' (Tinker's RL losses take no weights"),
    ("cross_entropy", {"target_tokens": torch.ones(4, dtype=torch.long), "mask": torch.ones(4)}, {}, "mask",
     "cross_entropy: unknown loss_fn_inputs key 'mask'; cross_entropy takes target_tokens, weights"),
    ("ppo", rl_inputs(target_tokens=torch.ones(4)), {}, "target_tokens",
     "ppo: loss_fn_inputs['target_tokens'] must be integer, got float32"),
    ("cispo", rl_inputs(advantages=torch.ones(4, dtype=torch.long)), {}, "advantages", "must be float, got int64"),
    ("dro", rl_inputs(logprobs=np.zeros(4, bool)), {"beta": 0.1}, "logprobs", "must be float, got bool"),
    ("ppo", rl_inputs(logprobs=torch.zeros(5)), {}, "logprobs", "must have shape (4,) to match model_input, got (5,)"),
    ("cross_entropy", {"target_tokens": torch.ones(4, 3, dtype=torch.long)}, {}, "target_tokens", "top-K"),
    ("ppo", rl_inputs(advantages=torch.tensor([1.0, math.nan, 0.0, 0.0])), {}, "advantages", "non-finite"),
    ("ppo", rl_inputs(logprobs=np.array([0, 0, -np.inf, 0], np.float32)), {}, "logprobs", "non-finite"),
    ("ppo", rl_inputs(target_tokens=torch.tensor([1, -100, 2, 3])), {}, "target_tokens", "negative token ids"),
    ("ppo", rl_inputs(advantages=[1.0, 1.0, 1.0, 1.0]), {}, "advantages", "must be a tensor, got list"),
    ("ppo", rl_inputs(), {"epsilon": 0.2}, "epsilon",
     "ppo: unknown loss_fn_config key 'epsilon' (ppo takes clip_low_threshold, clip_high_threshold)"),
    ("importance_sampling", rl_inputs(), {"clip_low_threshold": 0.8}, "clip_low_threshold",
     "takes no loss_fn_config"),
    ("ppo", rl_inputs(), {"clip_high_threshold": math.inf}, "clip_high_threshold", "must be finite, got inf"),
    ("ppo", rl_inputs(), {"clip_high_threshold": "1.2"}, "clip_high_threshold", "must be a number, got str"),
    ("cispo", rl_inputs(), {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "clip_low_threshold",
     "0 <= clip_low_threshold <= clip_high_threshold, got 1.5 and 1.2"),
    ("dro", rl_inputs(), {}, "beta", "dro: loss_fn_config['beta'] is required"),
    ("dro", rl_inputs(), {"beta": -1.0}, "beta", "must be >= 0"),
])
def test_input_errors_name_what_is_wrong(name, inputs, config, key, message) -> None:
    with pytest.raises(LossInputError) as caught:
        check_loss(name, inputs, config, 4)
    assert message in str(caught.value)
    assert caught.value.loss == name and caught.value.field == key
