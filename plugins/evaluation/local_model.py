"""A transformers model folder (optionally with a PEFT adapter) as the evaluation sees it: score, generate.

The base is loaded once; with an adapter it is wrapped in a `PeftModel`, and
`base_only()` switches the adapter off, so base and base+adapter run on the
very same weights in one process. Scores are computed in float32 from the
model's own logits (final soft-capping included, as `forward` applies it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jarvis.plugins.evaluation.eval_datasets import ScoringText
from jarvis.plugins.evaluation.perplexity import PerplexityResult, TextScore, check_window, score_token_ids


class LocalModel:
    def __init__(self, folder: str | Path, adapter: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = Path(folder)
        self.adapter = Path(adapter) if adapter else None
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=getattr(torch, dtype))
        if self.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter)
        self.model = model.to(device).eval()
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter else self.folder.name

    def model_info(self) -> Any:
        from jarvis.engine import ModelInfo

        return ModelInfo(id=self.folder.name, max_model_len=self.max_model_len,
                         architecture=self.model.config.model_type, chat_template=self.tokenizer.chat_template,
                         eos_token=self.tokenizer.eos_token or "")

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """The base model alone (the adapter switched off) inside the block."""
        if self.adapter is None:
            yield
            return
        with self.model.disable_adapter():
            yield

    # --- perplexity ---------------------------------------------------------------------------------

    def token_ids(self, text: ScoringText) -> tuple[list[int], int]:
        """The ids of context+target (tokenized together, special tokens added) and the first target index."""
        ids = self.tokenizer(text.text)["input_ids"]
        if not text.context:
            return ids, 1
        n_context = len(self.tokenizer(text.context)["input_ids"])
        try:
            offsets = self.tokenizer(text.text, return_offsets_mapping=True)["offset_mapping"]
            starts = [i for i, (a, b) in enumerate(offsets) if b > a and a >= len(text.context)]
            return ids, starts[0] if starts else len(ids)
        except (NotImplementedError, ValueError, TypeError, KeyError):
            return ids, n_context

    def window_logprobs(self, window: Sequence[int], positions: Sequence[int]) -> list[float]:
        import torch

        ids = torch.tensor([list(window)], device=self.device)
        index = torch.tensor(list(positions), device=self.device)
        with torch.inference_mode():
            try:  # the output projection only where a token is scored (a 262k vocabulary is costly)
                logits = self.model(input_ids=ids, logits_to_keep=index - 1).logits[0].float()
                rows = torch.arange(len(positions), device=self.device)
            except TypeError:
                logits = self.model(input_ids=ids).logits[0].float()
                rows = index - 1
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs[rows, ids[0, index]].tolist()

    def perplexity(self, texts: Sequence[ScoringText], max_length: int | None = None, stride: int | None = None,
                   progress: Any = None) -> PerplexityResult:
        max_length = min(max_length or self.max_model_len, self.max_model_len)
        stride = check_window(max_length, stride)
        result = PerplexityResult(self.name, source="local", settings={"max_length": max_length, "stride": stride})
        for text in texts:
            ids, first = self.token_ids(text)
            nll, count = score_token_ids(ids, first, self.window_logprobs, max_length, stride)
            result.add(TextScore(text.id, nll, count))
            if progress:
                progress()
        return result

    # --- generation -----------------------------------------------------------------------------------

    def generate(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, seed: int,
                 stop: Sequence[str] = ()) -> dict[str, Any]:
        import torch

        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        stop_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        for s in stop:  # a stop string that is one token ends generation there, as the server's stop does
            ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                stop_ids.append(ids[0])
        torch.manual_seed(seed)
        sample = temperature > 0
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=sample,
                                      temperature=temperature if sample else None, top_p=top_p if sample else None,
                                      top_k=None, eos_token_id=stop_ids or None,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        text = text[:cut] if cut >= 0 else text
        return {"text": text, "completion_tokens": int(new.shape[0])}
