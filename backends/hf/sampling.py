"""Sampling for the transformers engine's waves: the next token of each row under its own settings.

`adjusted_logits` shapes one row's logits (logit_bias, repetition / presence / frequency penalties, the grammar
mask), `samples` says whether a request draws at all, `sample_rows` draws one token per row under each row's
temperature, top-k, min-p and top-p as one batch, and `seq_logprob` gives a chosen token's logprob and the top
alternatives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from jarvis.engine import PreparedRequest, TokenLogprob

if TYPE_CHECKING:
    from jarvis.backends.hf.waves import Sequence


def samples(request: PreparedRequest) -> bool:
    """Whether the request draws its tokens (else it takes the most likely one)."""
    return request.temperature > 0 and request.top_k != 1


def sample_rows(logits: torch.Tensor, requests: list[PreparedRequest], generator: torch.Generator) -> torch.Tensor:
    """One draw per row of `logits` under each row's temperature, top-k, min-p and top-p, as one batch."""
    device = logits.device
    temperature = torch.tensor([r.temperature for r in requests], device=device, dtype=logits.dtype)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    vocab = probs.shape[-1]
    top_k = [min(r.top_k, vocab) if r.top_k > 1 else 0 for r in requests]
    if any(top_k):  # keep each row's k most likely tokens (ties with the k-th kept)
        values = probs.topk(max(top_k), dim=-1).values
        kth = values.gather(1, torch.tensor([[max(k, 1) - 1] for k in top_k], device=device))
        kth = kth.masked_fill(torch.tensor([[k == 0] for k in top_k], device=device), 0.0)
        probs = probs.masked_fill(probs < kth, 0.0)
    min_p = [r.min_p for r in requests]
    if any(min_p):
        floor = torch.tensor(min_p, device=device, dtype=probs.dtype)[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    top_p = [r.top_p for r in requests]
    if any(p < 1.0 for p in top_p):  # the smallest set of most likely tokens whose mass reaches top_p
        ordered, order = probs.sort(dim=-1, descending=True)
        limit = torch.tensor(top_p, device=device, dtype=probs.dtype)[:, None] * ordered.sum(-1, keepdim=True)
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > limit, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def adjusted_logits(logits: torch.Tensor, i: int, seq: Sequence) -> torch.Tensor | None:
    """Row `i` of `logits` after logit_bias, penalties and the grammar mask; None when nothing applies (the row
    is not even indexed then: a 64-row step would pay 64 tensor views for nothing)."""
    r = seq.request
    penalised = (r.presence_penalty or r.frequency_penalty) and seq.generated
    if not (r.logit_bias or penalised or r.repetition_penalty != 1.0 or seq.matcher is not None):
        return None
    row = logits[i].clone()
    if r.logit_bias:
        ids = torch.tensor(list(r.logit_bias), device=row.device)
        row[ids] += torch.tensor(list(r.logit_bias.values()), device=row.device, dtype=row.dtype)
    if r.repetition_penalty != 1.0:  # transformers' rule: divide positive logits, multiply negative ones
        seen = torch.tensor(sorted({*seq.prompt_ids, *seq.generated}), device=row.device)
        picked = row[seen]
        row[seen] = torch.where(picked > 0, picked / r.repetition_penalty, picked * r.repetition_penalty)
    if penalised:
        ids, counts = torch.tensor(seq.generated, device=row.device).unique(return_counts=True)
        row[ids] -= r.presence_penalty + r.frequency_penalty * counts.to(row.dtype)
    if seq.matcher is not None:
        row = seq.matcher.mask(row)
    return row


def seq_logprob(tokenizer: Any, logits: torch.Tensor, token: int, text: str, top_n: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[str, float]] = []
    if top_n:
        values, ids = logprobs.topk(top_n)
        top = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
    return TokenLogprob(token=text, logprob=float(logprobs[token]), bytes=list(text.encode()), top=top,
                        token_id=int(token))
