"""The Tinker API end to end: the official `tinker` SDK, unchanged, against a real server (llama.cpp serving
the embedded model, the trainer on CPU), with two API keys.

Supervised loop: a LoRA training client on the served model, 20 steps of forward_backward(cross_entropy)
and optim_step on three fixed prompts; the loss falls, and a sampling client of the saved weights answers
a training prompt greedily with its trained continuation, which the base model did not. RL loop: each step
samples 8 answers from the weights just saved, rewards one digit, and trains with importance_sampling on the
sampler's logprobs; the mean reward rises. Each key sees only its own runs, and bad input is a user error
naming what is wrong.
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
    client.close("success").result()  # ends the session and its heartbeat thread


@pytest.fixture(scope="module")
def trained(service):
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0, train_unembed=False).result()
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
    base = service.create_sampling_client(base_model=MODEL).result()
    fresh = trained["training"].save_weights_and_get_sampling_client().result()
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


def test_what_the_engine_cannot_serve_is_refused_when_the_client_is_made(service):
    with pytest.raises(tinker.BadRequestError, match="train_unembed"):
        service.create_lora_training_client(base_model=MODEL, rank=4).result()  # the SDK's default trains lm_head too
    with pytest.raises(tinker.BadRequestError, match="not served here"):
        service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4, train_unembed=False).result()


def test_a_finished_session_frees_its_models(server, trained):
    import httpx

    with tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A) as client:  # closed: no heartbeat left
        training = client.create_lora_training_client(base_model=MODEL, rank=4, seed=2, train_unembed=False).result()
        datum = trained["data"][0]
        training.forward_backward([datum], "cross_entropy").result()
        session = training.model_id.rsplit(":train:", 1)[0]
        other = httpx.post(f"{server.base_url}/api/v1/sessions/{session}/finish", headers={"X-API-Key": KEY_B},
                           json={"reason": {"type": "success"}})
        assert other.status_code == 404 and "not found" in other.json()["detail"]  # not B's session
        done = httpx.post(f"{server.base_url}/api/v1/sessions/{session}/finish", headers={"X-API-Key": KEY_A},
                          json={"reason": {"type": "success"}})
        assert done.status_code == 200
        with pytest.raises(tinker.RequestFailedError, match="not loaded"):
            training.forward_backward([datum], "cross_entropy").result()


def test_another_key_sees_none_of_it(server, trained):
    model_id = trained["training"].model_id
    own = tinker.RestClient(base_url=server.base_url, api_key=KEY_A)
    assert own.get_training_run(model_id).result().training_run_id == model_id
    other = tinker.RestClient(base_url=server.base_url, api_key=KEY_B)
    with pytest.raises(tinker.NotFoundError):
        other.get_training_run(model_id).result()
    import httpx  # the sampler weights the engine serves are the service's: listed to no user key

    trained["training"].save_weights_and_get_sampling_client().result()
    for key in (KEY_A, KEY_B):
        headers = {"Authorization": f"Bearer {key}"}
        models = [m["id"] for m in httpx.get(f"{server.v1}/models", headers=headers).json()["data"]]
        adapters = httpx.get(f"{server.v1}/adapters", headers=headers).json()["data"]
        assert models == [MODEL] and adapters == [], (models, adapters)
    # ... and served on the OpenAI routes to the key that trained them, the 404 of an unknown model to another
    from jarvis.plugins.tinker.service import engine_name_of

    name = engine_name_of(trained["training"].save_weights_for_sampler("for-a").result().path)
    ask = {"model": name, "prompt": "Hi", "max_tokens": 1}
    answers = {key: httpx.post(f"{server.v1}/completions", json=ask, headers={"Authorization": f"Bearer {key}"})
               for key in (KEY_A, KEY_B)}
    assert answers[KEY_A].status_code == 200, answers[KEY_A].text
    assert answers[KEY_B].status_code == 404 and answers[KEY_B].json()["error"]["code"] == "model_not_found"


def rl_rewards(client) -> list[float]:
    """Sample 8 answers per step from the weights just saved, reward the target digit, and train with
    importance_sampling on the sampler's own logprobs (advantage = reward - mean): the mean reward per step."""
    training = client.create_lora_training_client(base_model=MODEL, rank=8, seed=1, train_unembed=False).result()
    tokenizer = training.get_tokenizer()
    prompt = tokenizer.encode("Pick a digit from 1 to 9, like 3 or 7. My digit:")
    rewards = []
    for step in range(RL_STEPS):
        sampler = training.save_weights_and_get_sampling_client().result()
        result = sampler.sample(types.ModelInput.from_ints(prompt), RL_SAMPLES,
                                types.SamplingParams(max_tokens=2, temperature=1.0, seed=100 * step)).result()
        scores = [float(tokenizer.decode(s.tokens).strip().startswith("7")) for s in result.sequences]
        mean = sum(scores) / len(scores)
        rewards.append(mean)
        data = []
        for s, score in zip(result.sequences, scores):
            seq = prompt + s.tokens
            n = len(prompt) - 1
            data.append(types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                                    loss_fn_inputs={"target_tokens": seq[1:],
                                                    "logprobs": [0.0] * n + list(s.logprobs),
                                                    "advantages": [0.0] * n + [score - mean] * len(s.tokens)}))
        if any(score != mean for score in scores):
            training.forward_backward(data, "importance_sampling").result()
            training.optim_step(types.AdamParams(learning_rate=RL_LR)).result()
    return rewards


def check_rewards_rise(rewards: list[float]) -> None:
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert late > early + 0.3 and late >= 0.75, rewards


def test_rl_loop_raises_the_reward(service):
    rewards = rl_rewards(service)
    print("llama_cpp sampler: mean reward per step:", rewards)
    check_rewards_rise(rewards)


RL_STEPS, RL_SAMPLES, RL_LR = 8, 8, 2e-3


def test_a_saved_state_resumes_exactly_in_a_new_server(start_jarvis, tmp_path):
    """save_state, then the next steps in the same server and, after a restart, from the checkpoint: the
    losses agree (weights) and so do the losses after one more step (the optimizer's state)."""
    env = dict(JARVIS_API_KEYS=KEY_A, JARVIS_MAX_MODEL_LEN="512")
    batch = [types.Datum(model_input=types.ModelInput.from_ints([2, 651, 7329, 2204, 563]),
                         loss_fn_inputs={"target_tokens": [651, 7329, 2204, 563, 236761],
                                         "weights": [0.0, 1.0, 1.0, 1.0, 1.0]})]
    adam = types.AdamParams(learning_rate=5e-3, grad_clip_norm=1.0)

    def next_two_losses(training) -> list[float]:
        first = training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
        training.optim_step(adam).result()
        return [first, training.forward(batch, "cross_entropy").result().metrics["loss:sum"]]

    server = start_jarvis(tmp_path, **env)
    try:
        with tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A) as client:
            training = client.create_lora_training_client(base_model=MODEL, rank=4, seed=3,
                                                          train_unembed=False).result()
            for _ in range(3):
                training.forward_backward(batch, "cross_entropy")
                training.optim_step(adam)
            path = training.save_state("after-3").result().path
            assert path == f"tinker://{training.model_id}/weights/after-3"
            uninterrupted = next_two_losses(training)
    finally:
        server.stop()
    server = start_jarvis(tmp_path, **env)  # the same state dir
    try:
        with tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A) as client:
            resumed = client.create_training_client_from_state_with_optimizer(path).result()
            assert next_two_losses(resumed) == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)
    finally:
        server.stop()


def sampled_vs_trained_gap(client, training) -> tuple[float, float]:
    """Sample 4 continuations from the current weights, then score the same tokens with the trainer's
    forward: (mean, max) absolute difference of the two logprobs per sampled token."""
    import numpy as np

    tokenizer = training.get_tokenizer()
    prompt = tokenizer.encode("Once upon a time")
    sampler = training.save_weights_and_get_sampling_client().result()
    sampled = sampler.sample(types.ModelInput.from_ints(prompt), 4,
                             types.SamplingParams(max_tokens=12, temperature=1.0, seed=7)).result().sequences
    data = [types.Datum(model_input=types.ModelInput.from_ints((prompt + s.tokens)[:-1]),
                        loss_fn_inputs={"target_tokens": (prompt + s.tokens)[1:],
                                        "weights": [0.0] * (len(prompt) + len(s.tokens) - 1)}) for s in sampled]
    scored = training.forward(data, "cross_entropy").result().loss_fn_outputs
    gaps = np.concatenate([np.abs(out["logprobs"].to_numpy()[len(prompt) - 1:] - np.asarray(s.logprobs))
                           for out, s in zip(scored, sampled)])
    return float(gaps.mean()), float(gaps.max())


@pytest.fixture(scope="module")
def hf_server(jarvis_server, hf_folder):
    return jarvis_server(JARVIS_INFERENCE_ENGINE="hf", JARVIS_API_KEYS=KEY_A, JARVIS_MAX_MODEL_LEN="512")


def test_sampled_logprobs_agree_with_the_trainers(service, hf_server):
    """On-policy RL needs the sampler's logprobs to be the trainer's: exact (float error) when the hf engine
    samples; on llama.cpp the Q4_K_M weights differ from the trainer's, and the gap is measured."""
    training = service.create_lora_training_client(base_model=MODEL, rank=4, seed=5, train_unembed=False).result()
    llama_mean, llama_max = sampled_vs_trained_gap(service, training)
    with tinker.ServiceClient(base_url=hf_server.base_url, api_key=KEY_A) as hf_client:
        hf_training = hf_client.create_lora_training_client(base_model=MODEL, rank=4, seed=5,
                                                            train_unembed=False).result()
        hf_mean, hf_max = sampled_vs_trained_gap(hf_client, hf_training)
    print(f"|sampled - trained| logprob per token: llama_cpp mean {llama_mean:.4f} max {llama_max:.4f}; "
          f"hf mean {hf_mean:.2e} max {hf_max:.2e}")
    assert hf_max < 1e-3, (hf_mean, hf_max)
    assert llama_mean < 0.5, (llama_mean, llama_max)


def test_accumulated_halves_equal_one_whole_batch_with_two_clients_at_once(service, trained):
    """Two training clients of one seed train side by side: one takes the batch in two forward_backward
    calls before its optim_step, the other in one; afterwards both score the batch alike."""
    data = trained["data"]
    whole, halves = (service.create_lora_training_client(base_model=MODEL, rank=4, seed=11,
                                                         train_unembed=False).result() for _ in range(2))
    adam = types.AdamParams(learning_rate=1e-2)
    pending = [whole.forward_backward(data, "cross_entropy"), halves.forward_backward(data[:1], "cross_entropy"),
               halves.forward_backward(data[1:], "cross_entropy"), whole.optim_step(adam), halves.optim_step(adam)]
    first = [p.result() for p in pending]
    assert first[0].metrics["loss:sum"] == pytest.approx(first[1].metrics["loss:sum"] + first[2].metrics["loss:sum"],
                                                         rel=1e-5)
    after = [c.forward(data, "cross_entropy").result().metrics["loss:sum"] for c in (whole, halves)]
    assert after[0] == pytest.approx(after[1], rel=1e-4) and after[0] < first[0].metrics["loss:sum"]


def test_a_custom_loss_trains_as_the_same_loss_built_in(service, trained):
    """`forward_backward_custom` (the SDK computes the loss and its gradient on the client, then sends
    cross_entropy with weights = -dLoss/dlogprobs): a custom weighted cross-entropy steps exactly as the
    built-in one."""
    import torch

    data = trained["data"]

    def weighted_ce(batch, logprobs):
        loss = sum(-(torch.tensor(d.loss_fn_inputs["weights"].to_numpy()) * lp).sum() for d, lp in zip(batch, logprobs))
        return loss, {"custom:sum": float(loss)}

    built_in, custom = (service.create_lora_training_client(base_model=MODEL, rank=4, seed=5,
                                                            train_unembed=False).result() for _ in range(2))
    adam = types.AdamParams(learning_rate=1e-2)
    reference = built_in.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    built_in.optim_step(adam).result()
    computed = custom.forward_backward_custom(data, weighted_ce).result()
    custom.optim_step(adam).result()
    assert computed.metrics["custom:sum"] == pytest.approx(reference, rel=1e-5)
    after = [c.forward(data, "cross_entropy").result().metrics["loss:sum"] for c in (built_in, custom)]
    assert after[0] == pytest.approx(after[1], rel=1e-4) and after[0] < reference


def test_prompt_logprobs_and_retired_snapshots(server, service, trained):
    training, tokenizer = trained["training"], trained["tokenizer"]
    prompt = trained["prompts"][1]
    oldest = training.save_weights_and_get_sampling_client().result()
    scored = oldest.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert len(scored) == len(prompt) and scored[0] is None and all(x is not None and x <= 0 for x in scored[1:])
    for _ in range(2):  # two newer snapshots retire the oldest from the engine
        training.save_weights_and_get_sampling_client().result()
    with pytest.raises(tinker.RequestFailedError, match="unloaded"):
        oldest.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=2)).result()
    named = training.save_weights_for_sampler("kept").result().path
    assert named == f"tinker://{training.model_id}/sampler_weights/kept"
    kept = service.create_sampling_client(model_path=named).result()
    assert "Zorbatown" in greedy(kept, prompt, tokenizer)
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY_A)
    info = rest.get_weights_info_by_tinker_path(named).result()
    assert (info.base_model, info.lora_rank, info.train_unembed) == (MODEL, 8, False)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_the_loops_sample_through_hf_and_vllm(engine, request):
    """The supervised loop with the hf engine (a server of this module) and the session's vLLM server (no keys:
    one user) as the sampler: the LoRA is published hot to them, and their logprobs of the sampled tokens equal
    the trainer's (both compute in fp32 on CPU), which is what the RL loop's importance sampling needs. The RL
    loop itself runs through hf here (and llama.cpp above), not vLLM: vLLM's CPU LoRA kernels gather each token's
    adapter weights one token at a time (about 1 s per prompt of 18 tokens here), so its 8 steps of 8 samples
    would take a minute; on a GPU they are vLLM's usual LoRA kernels."""
    if engine == "vllm":
        request.getfixturevalue("vllm_installed")
    server = request.getfixturevalue(f"{engine}_server")
    with tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A) as client:
        training = client.create_lora_training_client(base_model=MODEL, rank=8, seed=0, train_unembed=False).result()
        tokenizer = training.get_tokenizer()
        prompt, answer = FACTS[0]
        p = tokenizer.encode(prompt)
        a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        weights = [0.0] * (len(p) - 1) + [1.0] * len(a)
        datum = types.Datum(model_input=types.ModelInput.from_ints((p + a)[:-1]),
                            loss_fn_inputs={"target_tokens": (p + a)[1:], "weights": weights})
        for _ in range(12):
            training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=3e-3))
        fresh = training.save_weights_and_get_sampling_client().result()
        assert "pineapple" in greedy(fresh, p, tokenizer)
        mean, worst = sampled_vs_trained_gap(client, training)
        print(f"{engine} sampler: |sampled - trained| logprob per token: mean {mean:.2e} max {worst:.2e}")
        assert worst < 1e-3, (mean, worst)
        if engine == "hf":
            rewards = rl_rewards(client)
            print(f"{engine} sampler: RL mean reward per step: {rewards}")
            check_rewards_rise(rewards)
