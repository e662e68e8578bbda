"""The built-in loss functions of Tinker's `forward_backward(data, loss_fn, loss_fn_config)`, in torch.

Each loss works on one datum at a time and token by token: `target_logprobs[i]` is the trainer's
log-probability of `target_tokens[i]` (log_softmax of the logits at position i, gathered at the target),
and `datum_loss` returns the elementwise loss [N]. The caller sums it over the datum (and the batch),
backpropagates, and reports the sum as the metric `loss:sum`. Definitions, as Tinker documents them
(https://tinker-docs.thinkingmachines.ai/losses and the per-loss pages under /tinker/losses/):

- `cross_entropy`: `-weights * target_logprobs` (`weights` optional, default 1; any finite value, since
  the SDK's `forward_backward_custom` sends `weights = -dLoss/dlogprobs`).
- `importance_sampling`: `-ratio * advantages`, with `ratio = exp(target_logprobs - logprobs)` and
  `logprobs` the sampler's log-probabilities of the same tokens.
- `ppo`: `-min(ratio * advantages, clip(ratio, clip_low_threshold, clip_high_threshold) * advantages)`;
  thresholds are absolute ratio bounds, default 0.8 and 1.2.
- `cispo`: `-sg(clip(ratio, clip_low_threshold, clip_high_threshold)) * target_logprobs * advantages`
  (`sg`: stop-gradient); default thresholds 0.0 and 4.0 (a one-sided clip).
- `dro`: `-(target_logprobs * advantages - 0.5 * beta * (target_logprobs - logprobs) ** 2)`. Tinker documents
  no default `beta`, so here it must be given.

`check_loss` validates one datum's `loss_fn_inputs` and the request's `loss_fn_config` first and raises
`LossInputError`, a user error, naming the loss and the input or config key at fault.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

RL_INPUTS = ("target_tokens", "logprobs", "advantages")
CLIP_LOW, CLIP_HIGH = "clip_low_threshold", "clip_high_threshold"

Tensorish = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs: its required and optional `loss_fn_inputs`, and its `loss_fn_config` keys.

    `config` maps each allowed key to its default; `None` means the key has no default and must be given.
    `target_tokens` is the only integer input; every other input is float.
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required + self.optional


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", ("target_tokens",), ("weights",)),
        LossSpec("importance_sampling", RL_INPUTS),
        LossSpec("ppo", RL_INPUTS, config={CLIP_LOW: 0.8, CLIP_HIGH: 1.2}),
        LossSpec("cispo", RL_INPUTS, config={CLIP_LOW: 0.0, CLIP_HIGH: 4.0}),
        LossSpec("dro", RL_INPUTS, config={"beta": None}),
    )
}


class LossInputError(ValueError):
    """A user error in a `forward_backward` request: an unknown loss, a bad input or a bad config key.

    `loss` is the loss named in the request; `field` the input or config key at fault, if any.
    """

    def __init__(self, message: str, loss: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.loss = loss
        self.field = key


def _spec(name: str) -> LossSpec:
    spec = LOSSES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise LossInputError(f"unsupported loss_fn {name!r}; supported: {', '.join(LOSSES)}", loss=str(name))
    return spec


def resolve_config(name: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """`config` checked against the loss's keys, with the documented defaults filled in."""
    spec = _spec(name)
    config = {} if config is None else config
    for key, value in config.items():
        if key not in spec.config:
            takes = f"takes {', '.join(spec.config)}" if spec.config else "takes no loss_fn_config"
            raise LossInputError(f"{name}: unknown loss_fn_config key {key!r} ({name} {takes})", name, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LossInputError(f"{name}: loss_fn_config[{key!r}] must be a number, got {type(value).__name__}",
                                 name, key)
        if not math.isfinite(value):
            raise LossInputError(f"{name}: loss_fn_config[{key!r}] must be finite, got {value}", name, key)
    resolved: dict[str, float] = {}
    for key, default in spec.config.items():
        value = config.get(key, default)
        if value is None:
            raise LossInputError(f"{name}: loss_fn_config[{key!r}] is required (Tinker documents no default)",
                                 name, key)
        resolved[key] = float(value)
    if CLIP_LOW in resolved and not 0.0 <= resolved[CLIP_LOW] <= resolved[CLIP_HIGH]:
        raise LossInputError(f"{name}: clip thresholds must satisfy 0 <= {CLIP_LOW} <= {CLIP_HIGH}, got "
                             f"{resolved[CLIP_LOW]} and {resolved[CLIP_HIGH]}", name, CLIP_LOW)
    if resolved.get("beta", 0.0) < 0:
        raise LossInputError(f"{name}: loss_fn_config['beta'] must be >= 0, got {resolved['beta']}", name, "beta")
    return resolved


def _kind(value: Tensorish) -> str:
    """'int', 'float', 'bool' or the dtype's name."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            return "bool"
        if value.dtype.is_floating_point:
            return "float"
        return str(value.dtype).removeprefix("torch.") if value.dtype.is_complex else "int"
    return {"b": "bool", "i": "int", "u": "int", "f": "float"}.get(value.dtype.kind, str(value.dtype))


def check_loss(name: str, inputs: Mapping[str, Tensorish], config: Mapping[str, float] | None, length: int) -> None:
    """Validate one datum's `loss_fn_inputs` and the `loss_fn_config` for loss `name`.

    `length` is the datum's `model_input` length; every input must be 1-D of that length, finite,
    `target_tokens` integer and non-negative, the rest float. Raises `LossInputError`.
    """
    spec = _spec(name)
    resolve_config(name, config)
    for key in spec.required:
        if key not in inputs:
            raise LossInputError(f"{name}: loss_fn_inputs is missing {key!r} ({name} needs "
                                 f"{', '.join(spec.required)})", name, key)
    for key, value in inputs.items():
        if key not in spec.inputs:
            why = " (Tinker's RL losses take no weights; fold them into advantages)" if key == "weights" else ""
            raise LossInputError(f"{name}: unknown loss_fn_inputs key {key!r}{why}; {name} takes "
                                 f"{', '.join(spec.inputs)}", name, key)
        where = f"{name}: loss_fn_inputs[{key!r}]"
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise LossInputError(f"{where} must be a tensor, got {type(value).__name__}", name, key)
        want = "int" if key == "target_tokens" else "float"
        if _kind(value) != want:
            dtype = str(value.dtype).removeprefix("torch.")
            raise LossInputError(f"{where} must be {'integer' if want == 'int' else want}, got {dtype}", name, key)
        if tuple(value.shape) != (length,):
            extra = " (the (N, K) top-K form is not supported)" if value.ndim == 2 else ""
            raise LossInputError(f"{where} must have shape ({length},) to match model_input, got "
                                 f"{tuple(value.shape)}{extra}", name, key)
        if want == "float" and not bool(np.isfinite(value).all() if isinstance(value, np.ndarray)
                                        else torch.isfinite(value).all()):
            raise LossInputError(f"{where} has non-finite values (NaN or inf)", name, key)
        if want == "int" and bool((value < 0).any()):
            raise LossInputError(f"{where} has negative token ids", name, key)


def datum_loss(name: str, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
               config: Mapping[str, float] | None) -> torch.Tensor:
    """Elementwise loss [N] of one datum; `target_logprobs` [N] carries the gradient.

    Inputs are assumed checked by `check_loss`; they are cast to `target_logprobs`' dtype and device.
    """
    cfg = resolve_config(name, config)

    def get(key: str) -> torch.Tensor:
        return inputs[key].to(dtype=target_logprobs.dtype, device=target_logprobs.device)

    if name == "cross_entropy":
        return -target_logprobs * get("weights") if "weights" in inputs else -target_logprobs
    sampling_logprobs, advantages = get("logprobs"), get("advantages")
    if name == "dro":
        penalty = (target_logprobs - sampling_logprobs) ** 2
        return -(target_logprobs * advantages - 0.5 * cfg["beta"] * penalty)
    ratio = torch.exp(target_logprobs - sampling_logprobs)
    if name == "importance_sampling":
        return -ratio * advantages
    clipped = torch.clamp(ratio, cfg[CLIP_LOW], cfg[CLIP_HIGH])
    if name == "ppo":
        return -torch.minimum(ratio * advantages, clipped * advantages)
    return -clipped.detach() * target_logprobs * advantages  # cispo
