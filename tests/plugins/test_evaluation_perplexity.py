"""Perplexity: the plugin's value equals one computed here from the model's own logits (whole text, strided
windows, prompt + target, several texts token-weighted), and an endpoint's echoed logprobs give the value
the local path gives for the same model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jarvis.plugins.evaluation.eval_datasets import ScoringText, load_scoring_texts
from jarvis.plugins.evaluation.perplexity import check_window, score_endpoint_logprobs, windows

DATA = Path(__file__).parents[1] / "data"
LONG_TEXT = (DATA / "eval_long_text.txt").read_text()
SHORT_TEXT = "the keeper wrote in his log each night the wind the weather the ships that passed ."
PROMPT, TARGET = "question what does the keeper polish ? answer", " the great lens ."


@pytest.fixture(scope="module")
def tiny_random_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama and a word-level tokenizer built offline from the test texts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for text in (LONG_TEXT, SHORT_TEXT, PROMPT, TARGET) for w in text.lower().split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("tiny-random-llama")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def logits_of(model, ids):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def direct_nll(model, ids, positions) -> float:
    """Full context: -sum log p(ids[p] | ids[:p]) from one forward pass."""
    logprobs = logits_of(model, ids)
    return -sum(float(logprobs[p - 1, ids[p]]) for p in positions)


def direct_strided_nll(model, ids, max_length: int, stride: int) -> float:
    """Position p (1..n-1) belongs to chunk (p-1)//stride, predicted from the max_length tokens ending with it."""
    total = 0.0
    for p in range(1, len(ids)):
        end = min(1 + ((p - 1) // stride + 1) * stride, len(ids))
        start = max(0, end - max_length)
        logprobs = logits_of(model, ids[start:end])
        total -= float(logprobs[p - 1 - start, ids[p]])
    return total


def test_window_plan_scores_every_token_once_with_enough_context():
    for n, length, stride in [(100, 16, 6), (17, 16, 15), (16, 16, 8), (250, 64, 32), (2, 8, 4)]:
        plan = windows(n, length, stride)
        scored = [p for _, first, end in plan for p in range(first, end)]
        assert scored == list(range(1, n))
        for start, first, end in plan:
            assert end - start <= length and first - start >= (1 if n <= length else min(first, length - stride))
    with pytest.raises(ValueError):
        check_window(16, 16)
    assert check_window(16, None) == 8


def test_endpoint_logprobs_skip_the_null_first_token_and_the_prompt():
    tokens = ["Hello", " world", " and", " more"]
    nll, count = score_endpoint_logprobs(tokens, [None, -1.0, -2.0, -0.5], None, 0)
    assert (nll, count) == (3.5, 3)
    nll, count = score_endpoint_logprobs(tokens, [None, -1.0, -2.0, -0.5], [0, 5, 11, 15], len("Hello world"))
    assert (nll, count) == (2.5, 2)


@pytest.mark.slow
def test_local_perplexity_equals_the_models_own_logits(tiny_random_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jarvis.plugins.evaluation.local_model import LocalModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_llama).eval()
    local = LocalModel(tiny_random_llama)

    ids = tokenizer(SHORT_TEXT)["input_ids"]
    expected = math.exp(direct_nll(model, ids, range(1, len(ids))) / (len(ids) - 1))
    result = local.perplexity([ScoringText("short", "", SHORT_TEXT)])
    assert result.tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-6, abs=1e-4)

    # strided: a text ~7x longer than the window
    long_ids = tokenizer(LONG_TEXT)["input_ids"]
    assert len(long_ids) > 100
    strided = local.perplexity([ScoringText("long", "", LONG_TEXT)], max_length=16, stride=6)
    expected_strided = math.exp(direct_strided_nll(model, long_ids, 16, 6) / (len(long_ids) - 1))
    assert strided.tokens == len(long_ids) - 1
    assert strided.perplexity == pytest.approx(expected_strided, rel=1e-6, abs=1e-4)
    whole = local.perplexity([ScoringText("long", "", LONG_TEXT)], max_length=256)
    expected_whole = math.exp(direct_nll(model, long_ids, range(1, len(long_ids))) / (len(long_ids) - 1))
    assert whole.perplexity == pytest.approx(expected_whole, rel=1e-6, abs=1e-4)
    assert strided.perplexity != pytest.approx(whole.perplexity, rel=1e-6)  # less context is another number

    # a prompt and its target: only the target's tokens are scored
    pair_ids = tokenizer(PROMPT + TARGET)["input_ids"]
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    pair = local.perplexity([ScoringText("pair", PROMPT, TARGET)])
    assert pair.tokens == len(pair_ids) - n_prompt == len(TARGET.split())
    assert pair.nll == pytest.approx(direct_nll(model, pair_ids, range(n_prompt, len(pair_ids))), rel=1e-6)

    # several texts: token-weighted, not the mean of per-text perplexities
    both = local.perplexity([ScoringText("short", "", SHORT_TEXT), ScoringText("pair", PROMPT, TARGET)])
    weighted = math.exp((result.nll + pair.nll) / (result.tokens + pair.tokens))
    assert both.perplexity == pytest.approx(weighted, rel=1e-9)
    assert both.perplexity != pytest.approx((result.perplexity + pair.perplexity) / 2, rel=1e-3)


@pytest.mark.slow
def test_perplexity_command_writes_the_reports(tiny_random_llama, tmp_path, jarvis_cli):
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate([SHORT_TEXT, LONG_TEXT])))
    run = jarvis_cli("eval", "perplexity", str(data), "--model", str(tiny_random_llama), "--max-length", "32",
                     "--stride", "8", "--output", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    ppl = report["runs"]["base"]["perplexity"]
    assert ppl["settings"] == {"max_length": 32, "stride": 8}
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll_sum"] / ppl["scored_tokens"]))
    for name in ("perplexity.md", "perplexity.html", "perplexity-comparison.png"):
        assert (tmp_path / "out" / name).is_file()


@pytest.mark.slow
def test_endpoint_perplexity_equals_local_for_the_same_model(hf_folder, start_jarvis, tmp_path):
    """The HF engine serving the converted embedded model vs the same folder loaded here, both float32 on
    CPU over the same token ids and the same scored positions (asserted exactly): only the order of
    float32 sums inside the kernels may differ, which moves a log-softmax by ~1e-6 relative (measured here:
    at most 2e-7). 1e-4 relative on each text's summed NLL leaves room for other CPUs' kernels while
    still catching any real difference: one token more or less, or one shifted position, moves it by
    more than 1e-2."""
    from jarvis.plugins.evaluation.endpoint_model import EndpointModel
    from jarvis.plugins.evaluation.evaluation_runs import resolve_chat_format
    from jarvis.plugins.evaluation.local_model import LocalModel

    server = start_jarvis(tmp_path, JARVIS_INFERENCE_ENGINE="hf", JARVIS_DTYPE="fp32")
    try:
        assert server.health()["status"] == "ready", server.log()
        texts = [ScoringText("short", "", SHORT_TEXT)]
        texts += load_scoring_texts(DATA / "eval_facts_heldout.jsonl", resolve_chat_format("gemma", None))[:2]
        endpoint = EndpointModel(server.base_url)
        remote = endpoint.perplexity(texts)
        endpoint.close()
    finally:
        server.stop()
    local = LocalModel(hf_folder).perplexity(texts)
    assert [t.tokens for t in remote.texts] == [t.tokens for t in local.texts]
    print("\nendpoint vs local NLL, relative:",
          [abs(r.nll - lo.nll) / lo.nll for r, lo in zip(remote.texts, local.texts)])
    for r, lo in zip(remote.texts, local.texts):
        assert r.nll == pytest.approx(lo.nll, rel=1e-4), r.id
    assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-4)
