"""Training on the real embedded model (CPU): loss falls, the base stays frozen, resume continues the
same curve, accumulation equals a bigger batch, MLflow holds the run, and train → publish → serve works."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from jarvis.plugins.chat_formats.families import GEMMA
from jarvis.plugins.training import trainer
from jarvis.plugins.training.config import TrainConfig, build_config
from jarvis.plugins.training.datasets import prepare_dataset, split_eval

pytestmark = pytest.mark.slow

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def base_model(hf_folder):
    """The embedded base loaded once (`trainer.load_base`); each test trains on its own deep copy."""
    return trainer.load_base(TrainConfig(data=DATA / "train_small.jsonl"), hf_folder, "cpu")


def fresh_lora(base_model, config: TrainConfig):
    model, tokenizer = base_model
    return trainer.attach_lora(copy.deepcopy(model), config), tokenizer


def items_of(config: TrainConfig, tokenizer):
    report = prepare_dataset(config.data, GEMMA)
    train_examples, eval_examples = split_eval(report.examples, config.eval_fraction, config.seed)
    return (trainer.tokenize_examples(train_examples, tokenizer, config.max_length),
            trainer.tokenize_examples(eval_examples, tokenizer, config.max_length))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_training_lowers_loss_and_leaves_the_base_untouched(base_model, tmp_path):
    from peft import PeftModel

    config = TrainConfig(data=DATA / "train_small.jsonl", max_steps=10, learning_rate=1e-3, dropout=0.0,
                         save_every=100, tracker="none", eval_fraction=0.2)
    model, tokenizer = fresh_lora(base_model, config)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    before = base_weights(model)
    train_items, eval_items = items_of(config, tokenizer)
    result = trainer.train(model, tokenizer, train_items, eval_items, config, tmp_path / "out", "cpu")
    assert result.steps == 10
    assert result.last_loss < result.first_loss * 0.5
    assert result.eval_loss_after < result.eval_loss_before
    after = base_weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a base weight changed"
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base_model[0]), tmp_path / "out")
    lora = {n: p for n, p in reloaded.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())


def test_accumulated_micro_batches_equal_one_big_batch(base_model):
    """In float64, so the comparison sees the method and not float32's summation-order noise (which, with
    Gemma's large activations, reaches ~1e-3 relative in the LoRA gradients either way)."""
    config = TrainConfig(data=DATA / "train_small.jsonl", dropout=0.0, tracker="none")
    model, tokenizer = fresh_lora(base_model, config)
    model.double()
    items, _ = items_of(config, tokenizer)
    batch = items[:4]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def update(groups):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        loss, tokens = trainer.optimizer_step(model, optimizer, [trainer.collate(g, 0, "cpu") for g in groups])
        return loss, tokens, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_one, tokens_one, one = update([batch])
    loss_acc, tokens_acc, acc = update([batch[:1], batch[1:3], batch[3:]])
    assert tokens_one == tokens_acc
    assert loss_acc == pytest.approx(loss_one, rel=1e-12)
    assert any(not torch.equal(one[n], start[n]) for n in one), "the step changed nothing"
    for n in one:
        torch.testing.assert_close(acc[n], one[n], rtol=1e-10, atol=1e-12)


def test_resume_continues_the_step_count_and_the_loss_curve(base_model, tmp_path):
    config = TrainConfig(data=DATA / "train_small.jsonl", max_steps=4, save_every=2, learning_rate=1e-3,
                         dropout=0.0, tracker="none", eval_fraction=0.0)

    def run(out: Path, resume: bool = False, stop_at: int | None = None):
        model, tokenizer = fresh_lora(base_model, config)
        train_items, _ = items_of(config, tokenizer)

        def on_step(report):
            if stop_at is not None and report.step == stop_at:
                raise KeyboardInterrupt  # the run dies after its step-2 checkpoint
        return trainer.train(model, tokenizer, train_items, [], config, out, "cpu", resume=resume, on_step=on_step)

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "broken", stop_at=3)
    assert [p.name for p in trainer.checkpoint_dirs(tmp_path / "broken")] == ["step-2"]
    resumed = run(tmp_path / "broken", resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    full = json.loads((tmp_path / "straight" / "training.json").read_text())["losses"]
    again = json.loads((tmp_path / "broken" / "training.json").read_text())["losses"]
    assert len(again) == len(full) == 4
    assert again == pytest.approx(full, rel=1e-4)
    assert resumed.last_loss == pytest.approx(straight.last_loss, rel=1e-4)


def test_config_file_and_flags_are_validated(tmp_path):
    file = tmp_path / "train.yaml"
    file.write_text("data: x.jsonl\nrank: 16\nlearning_rate: 0.001\n")
    config = build_config(file, rank=32)
    assert config.rank == 32 and config.learning_rate == 0.001  # flags override the file
    toml = tmp_path / "train.toml"
    toml.write_text('data = "x.jsonl"\nschedule = "cosine"\n')
    assert build_config(toml).schedule == "cosine"
    from jarvis.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config(file, learning_rate=5.0)
    assert info.value.setting == "--learning-rate" and "2e-4" in info.value.fix
    with pytest.raises(ConfigError) as info:
        build_config(file, tracker="wandb")
    assert "--tracker none" in info.value.fix


def test_cli_reports_invalid_rows_and_refuses_qlora_on_cpu(jarvis_cli, tmp_path):
    adapters = str(tmp_path / "adapters")
    with ThreadPoolExecutor(3) as pool:  # three independent commands (the strict and qlora ones write nothing)
        training = pool.submit(jarvis_cli, "train", "--data", str(DATA / "mixed_invalid.jsonl"), "--name", "mixed",
                               "--max-steps", "1", "--tracker", "none", cwd=tmp_path, JARVIS_ADAPTER_ROOT=adapters)
        striving = pool.submit(jarvis_cli, "train", "--data", str(DATA / "mixed_invalid.jsonl"), "--strict",
                               "--tracker", "none", cwd=tmp_path, JARVIS_ADAPTER_ROOT=adapters)
        refusing = pool.submit(jarvis_cli, "train", "--data", str(DATA / "train_small.jsonl"), "--qlora",
                               "--tracker", "none", cwd=tmp_path, JARVIS_DEVICE="cpu")
        done, strict, qlora = training.result(), striving.result(), refusing.result()
    assert done.returncode == 0, done.stderr
    assert "skipped line 8: not valid JSON" in done.stderr and "skipped bad-role:" in done.stderr
    assert "6 examples (12 invalid skipped)" in done.stderr
    assert strict.returncode == 2 and "--data" in strict.stderr
    assert qlora.returncode == 2 and "CUDA" in qlora.stderr and "drop --qlora" in qlora.stderr


def test_train_publish_serve_with_mlflow(jarvis_cli, hf_folder, base_model, jarvis_server, tmp_path):
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapters = tmp_path / "adapters"
    server = jarvis_server(JARVIS_ADAPTER_ROOT=str(adapters), JARVIS_MAX_MODEL_LEN="512")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300)
    question = [{"role": "user", "content": "What colour is snow?"}]
    base_answer = client.chat.completions.create(model="gemma-3-270m", messages=question, max_tokens=12,
                                                 temperature=0).choices[0].message.content

    done = jarvis_cli("train", "--data", str(DATA / "train_small.jsonl"), "--name", "facts", "--max-steps", "16",
                  "--learning-rate", "1e-3", "--save-every", "8", "--log-every", "2", "--publish", server.base_url,
                  cwd=tmp_path, JARVIS_ADAPTER_ROOT=str(adapters))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert "published" in done.stderr

    # served under its name, no restart; its answer is what PEFT gives offline for the same prompt
    assert "facts" in {m.id for m in client.models.list().data}
    answer = client.chat.completions.create(model="facts", messages=question, max_tokens=12, temperature=0)
    text = answer.choices[0].message.content
    assert text != base_answer
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model[0]), adapters / "facts").eval()
    inputs = tokenizer(GEMMA(question, True), return_tensors="pt")
    with torch.inference_mode():
        out = peft_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    offline = tokenizer.decode(out[0, inputs.input_ids.shape[1]:]).split("<end_of_turn>")[0]
    assert text == offline
    assert answer.choices[0].finish_reason == "stop"  # it learned to end its turn

    # the MLflow run, read back through MLflow's client
    tracking = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracking.get_run(summary["tracker_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["rank"] == "8" and run.data.params["learning_rate"] == "0.001"
    history = tracking.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(2, 17, 2))
    assert history[-1].value < history[0].value
    assert run.data.metrics["eval_loss"] < run.data.metrics["eval_loss_before"]
    artifacts = {a.path for a in tracking.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "adapter"} <= artifacts
    assert {a.path for a in tracking.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/step-8"}
    assert httpx.get(f"{server.v1}/adapters").json()["data"][0]["name"] == "facts"


def test_dora_trains_and_merge_writes_a_full_model(jarvis_cli, base_model, tmp_path):
    """DoRA is an option of the same loop; `jarvis adapters merge` writes a model that generates what
    base + adapter generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = tmp_path / "adapters"
    done = jarvis_cli("train", "--data", str(DATA / "train_small.jsonl"), "--name", "dora", "--dora",
                      "--max-steps", "4", "--learning-rate", "2e-3", "--tracker", "none", cwd=tmp_path,
                      JARVIS_ADAPTER_ROOT=str(adapters))
    assert done.returncode == 0, done.stderr
    config = json.loads((adapters / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 8
    merged_dir = tmp_path / "merged"
    merged = jarvis_cli("adapters", "merge", str(adapters / "dora"), "--out", str(merged_dir), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    inputs = tokenizer(GEMMA([{"role": "user", "content": "What colour is grass?"}], True), return_tensors="pt")

    def greedy(model) -> list[int]:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()

    full = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in n for n, _ in full.named_parameters())
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(base_model[0]), adapters / "dora")
    assert greedy(full) == greedy(with_adapter)
