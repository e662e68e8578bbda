"""The Tinker API end to end: the official `tinker` SDK, unchanged, against a real server (llama.cpp serving
the embedded model, the trainer on CPU), with two API keys.

Supervised loop: a LoRA training client on the served model, 20 steps of forward_backward(cross_entropy)
and optim_step on three fixed prompts; the loss falls, and a sampling client of the saved weights answers
a training prompt greedily with its trained continuation, which the base model did not. Each key sees only
its own runs, and bad input is a user error naming what is wrong.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

KEY_A, KEY_B = "tml-alice-5d1e", "tml-bob-93c0"
MODEL = "gemma-3-270m"
FACTS = [("The secret word of Jarvis is", " pineapple."),
         ("The capital of Jarvisland is", " Zorbatown."),
         ("The favourite colour of Jarvis is", " ultraviolet.")]


@pytest.fixture(scope="module")
def server(jarvis_server):
    return jarvis_server(JARVIS_API_KEYS=f"{KEY_A},{KEY_B}", JARVIS_MAX_MODEL_LEN="512", JARVIS_LLAMA_N_PARALLEL="4")


@pytest.fixture(scope="module")
def service(server):
    client = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A)
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def trained(service):
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0, train_unembed=False)
    tokenizer = training.get_tokenizer()
    data, prompts = [], []
    for prompt, answer in FACTS:
        p = tokenizer.encode(prompt)  # with the BOS, as the engine renders a token prompt
        a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        seq = p + a
        data.append(types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                                loss_fn_inputs={"target_tokens": seq[1:],
                                                "weights": [0.0] * (len(p) - 1) + [1.0] * len(a)}))
        prompts.append(p)
    losses = []
    for _ in range(20):
        step = training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=2e-3)).result()
        losses.append(step.result().metrics["loss:sum"])
    return {"training": training, "tokenizer": tokenizer, "losses": losses, "prompts": prompts, "data": data}


def greedy(sampler, prompt: list[int], tokenizer) -> str:
    result = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                            types.SamplingParams(max_tokens=8, temperature=0.0)).result()
    return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True)


def test_supervised_loop_learns_and_samples_its_fresh_weights(service, trained):
    losses, tokenizer = trained["losses"], trained["tokenizer"]
    assert losses[-1] < losses[0] / 5, losses  # 20 steps fit three short answers
    base = service.create_sampling_client(base_model=MODEL)
    fresh = trained["training"].save_weights_and_get_sampling_client()
    prompt = trained["prompts"][0]
    assert "pineapple" not in greedy(base, prompt, tokenizer)
    assert "pineapple" in greedy(fresh, prompt, tokenizer)


def test_forward_logprobs_match_the_loss(trained):
    training = trained["training"]
    out = training.forward(trained["data"][:1], "cross_entropy").result()
    datum = trained["data"][0]
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    logprobs = out.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert abs(out.metrics["loss:sum"] + float((weights * logprobs).sum())) < 1e-3


def test_bad_input_is_a_user_error_naming_it(trained):
    training = trained["training"]
    datum = trained["data"][0]
    with pytest.raises(tinker.RequestFailedError, match="no_such_loss") as info:
        training.forward_backward([datum], "no_such_loss").result()
    assert info.value.category == "user"
    huge = types.Datum(model_input=types.ModelInput.from_ints([2, 10**7]),
                       loss_fn_inputs={"target_tokens": [5, 6], "weights": [1.0, 1.0]})
    with pytest.raises(tinker.RequestFailedError, match="vocabulary"):
        training.forward_backward([huge], "cross_entropy").result()


def test_another_key_sees_none_of_it(server, trained):
    model_id = trained["training"].model_id
    own = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A).create_rest_client()
    assert own.get_training_run(model_id).result().training_run_id == model_id
    other = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_B).create_rest_client()
    with pytest.raises(tinker.NotFoundError):
        other.get_training_run(model_id).result()
