"""Any OpenAI-compatible endpoint as the evaluation sees it: score a text's tokens, generate an answer.

Scoring sends the text as a completion prompt with `echo: true`,
`logprobs: 1` and `max_tokens: 0`, and reads back the prompt's token
logprobs (the first is null: it has no context). With an adapter served
under its own name, `model` is that name. Each text is scored whole, so it
must fit the server's context; windows for longer texts are a local feature
(the client does not know the server's tokenizer to cut them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jarvis.plugins.evaluation.eval_datasets import ScoringText
from jarvis.plugins.evaluation.perplexity import PerplexityResult, TextScore, score_endpoint_logprobs


class EndpointError(RuntimeError):
    """The endpoint refused or answered something that is not an OpenAI response."""


def api_base(url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> `http://host:8000/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def list_models(url: str, api_key: str | None = None, timeout: float = 30) -> list[str]:
    import httpx

    r = httpx.get(f"{api_base(url)}/models", headers=auth_headers(api_key), timeout=timeout)
    if r.status_code != 200:
        raise EndpointError(f"{url}: GET /v1/models answered {r.status_code}: {r.text[:300]}")
    return [m["id"] for m in r.json().get("data", [])]


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class EndpointModel:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600) -> None:
        import httpx

        self.url = api_base(url)
        self.api_key = api_key
        self.model = model or (list_models(url, api_key) or [None])[0]
        if not self.model:
            raise EndpointError(f"{url} lists no models; pass --model")
        self.client = httpx.Client(base_url=self.url, headers=auth_headers(api_key), timeout=timeout)

    @property
    def name(self) -> str:
        return self.model

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(path, json={"model": self.model, **body})
        if r.status_code != 200:
            raise EndpointError(f"{self.url}{path} (model {self.model}) answered {r.status_code}: {r.text[:500]}")
        return r.json()

    def score(self, text: ScoringText) -> TextScore:
        data = self._post("/completions", {"prompt": text.text, "max_tokens": 0, "echo": True, "logprobs": 1,
                                           "temperature": 0})
        logprobs = (data.get("choices") or [{}])[0].get("logprobs") or {}
        if not logprobs.get("token_logprobs"):
            raise EndpointError(f"{self.url} returned no prompt logprobs for model {self.model}; it must support "
                                "echo with logprobs on /v1/completions")
        nll, count = score_endpoint_logprobs(logprobs.get("tokens") or [], logprobs["token_logprobs"],
                                             logprobs.get("text_offset"), len(text.context))
        return TextScore(text.id, nll, count)

    def perplexity(self, texts: Sequence[ScoringText], progress: Any = None, **_: Any) -> PerplexityResult:
        result = PerplexityResult(self.model, source="endpoint", settings={"url": self.url})
        for text in texts:
            result.add(self.score(text))
            if progress:
                progress()
        return result

    def generate(self, prompt: str | None, messages: list[dict[str, str]] | None, *, max_tokens: int,
                 temperature: float, top_p: float, seed: int, stop: Sequence[str] = ()) -> dict[str, Any]:
        decoding = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        if stop:
            decoding["stop"] = list(stop)
        if messages is not None and prompt is None:
            data = self._post("/chat/completions", {"messages": messages, **decoding})
            text = data["choices"][0]["message"].get("content") or ""
        else:
            data = self._post("/completions", {"prompt": prompt, **decoding})
            text = data["choices"][0].get("text") or ""
        return {"text": text, "completion_tokens": (data.get("usage") or {}).get("completion_tokens")}

    def close(self) -> None:
        self.client.close()
