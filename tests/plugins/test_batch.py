"""The batch plugin end to end: the official `openai` client against a real server (Files and Batches
API, malformed lines, cancel, pagination, upload limits), a SIGKILLed server that resumes its job, and
the offline `jarvis batch run` with --resume after the process is killed."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
CHAT = "/v1/chat/completions"
MAX_UPLOAD = 200_000


def request_line(custom_id: str, content: str, *, url: str = CHAT, method: str = "POST", **body: object) -> str:
    payload = ({"model": MODEL, "prompt": content, "max_tokens": 8, "temperature": 0} if url == "/v1/completions"
               else {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                     "temperature": 0})
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": {**payload, **body}})


def valid_lines(n: int, prefix: str = "req") -> dict[str, str]:
    return {f"{prefix}-{i}": request_line(f"{prefix}-{i}", f"Question {i}: name a color.") for i in range(n)}


# Each malformed line, and a word its error must contain.
MALFORMED = [
    ('{"custom_id": "broken", "method": "POST", ', "json"),
    (json.dumps({"method": "POST", "url": CHAT, "body": {"model": MODEL, "messages": []}}), "custom_id"),
    (request_line("req-0", "I repeat an id"), "duplicate"),
    (request_line("bad-url", "x", url="/v1/moderations"), "url"),
    (request_line("bad-method", "x", method="GET"), "method"),
    (request_line("other-endpoint", "x", url="/v1/completions"), "endpoint"),
    (json.dumps({"custom_id": "bad-body", "method": "POST", "url": CHAT,
                 "body": {"model": MODEL, "messages": [], "max_tokens": 8}}), "messages"),
    (request_line("bad-model", "x", model="no-such-model"), "no-such-model"),
    (request_line("streaming", "x", stream=True), "stream"),
]


def mixed_input(n_valid: int) -> tuple[bytes, dict[str, str]]:
    valid = valid_lines(n_valid)
    lines = list(valid.values())
    for i, (line, _) in enumerate(MALFORMED):  # spread the bad lines among the good ones
        lines.insert(2 + 2 * i, line)
    return ("\n".join(lines) + "\n").encode(), valid


def error_text(record: dict) -> str:
    if record["error"] is not None:
        return f"{record['error']['code']} {record['error']['message']}"
    return json.dumps(record["response"]["body"]["error"])


def check_results(output: list[dict], errors: list[dict], valid_ids: set[str], *, n_malformed: int) -> None:
    """Every valid custom_id answered exactly once with a real chat completion; every bad line explained."""
    answered = [r["custom_id"] for r in output]
    assert sorted(answered) == sorted(valid_ids), "each valid line has exactly one response"
    for record in output:
        assert record["error"] is None and record["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(record["response"]["body"])
        assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens <= 8
    assert len(errors) == n_malformed
    for record, (_, word) in zip(errors, MALFORMED):  # the error file keeps input order
        assert word.lower() in error_text(record).lower(), (word, record)
    assert errors[7]["response"]["status_code"] == 404 and errors[6]["response"]["status_code"] == 400
    assert errors[0]["error"]["code"] == "invalid_json" and errors[2]["error"]["code"] == "duplicate_custom_id"


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for_batch(client: openai.OpenAI, batch_id: str, timeout: float = 240, until=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if (until(batch) if until else batch.status in ("completed", "failed", "cancelled", "expired")):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status}: {batch.request_counts}")


# --- the API with the official client ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(jarvis_server):
    return jarvis_server(JARVIS_BATCH_CONCURRENCY="4", JARVIS_LLAMA_N_PARALLEL="2",
                         JARVIS_BATCH_MAX_UPLOAD_BYTES=str(MAX_UPLOAD))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def test_batch_of_good_and_malformed_lines(client):
    data, valid = mixed_input(22)
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.filename == "requests.jsonl"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"suite": "batch"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"suite": "batch"}
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (31, 22, 9)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    check_results(output, errors, set(valid), n_malformed=len(MALFORMED))
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_completions_endpoint(client):
    lines = [request_line(f"c{i}", f"The number {i} is", url="/v1/completions") for i in range(3)]
    uploaded = client.files.create(file=("c.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = wait_for_batch(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h").id)
    assert batch.status == "completed" and batch.error_file_id is None
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert [r["custom_id"] for r in output] == ["c0", "c1", "c2"]
    for record in output:
        assert Completion.model_validate(record["response"]["body"]).object == "text_completion"


def test_embeddings_endpoint(client):
    texts = ["The cat sat.", "Paris is in France.", "Two plus two is four."]
    lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": MODEL, "input": text}}) for i, text in enumerate(texts)]
    lines.append(json.dumps({"custom_id": "e-bad", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": MODEL, "input": "x", "dimensions": 8}}))
    uploaded = client.files.create(file=("e.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = wait_for_batch(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h").id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    output = {r["custom_id"]: r for r in read_jsonl(client.files.content(batch.output_file_id).text)}
    # each alone, as each line embeds it (llama.cpp's batched decode differs in the last digits)
    direct = [client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0] for text in texts]
    for i, item in enumerate(direct):
        body = CreateEmbeddingResponse.model_validate(output[f"e{i}"]["response"]["body"])
        line_vector = body.data[0].embedding
        assert sum(a * b for a, b in zip(line_vector, item.embedding)) > 0.9999
    refused = read_jsonl(client.files.content(batch.error_file_id).text)[0]
    assert refused["response"]["status_code"] == 400 and refused["response"]["body"]["error"]["param"] == "dimensions"


def test_messages_endpoint(client):
    """Anthropic's Messages in a batch: each line's body is the `message` its route returns, each refusal
    Anthropic's error object."""
    ask = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    lines = [json.dumps({"custom_id": "m0", "method": "POST", "url": "/v1/messages", "body": ask}),
             json.dumps({"custom_id": "m-bad", "method": "POST", "url": "/v1/messages",
                         "body": {**ask, "thinking": {"type": "enabled", "budget_tokens": 1024}}})]
    uploaded = client.files.create(file=("m.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = wait_for_batch(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/messages", completion_window="24h").id)  # type: ignore[arg-type]
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    (done,) = read_jsonl(client.files.content(batch.output_file_id).text)
    message = done["response"]["body"]
    assert message["type"] == "message" and message["usage"]["output_tokens"] >= 1
    assert message["content"][0]["type"] == "text" and message["stop_reason"] in ("end_turn", "max_tokens")
    (refused,) = read_jsonl(client.files.content(batch.error_file_id).text)
    assert refused["response"]["status_code"] == 400
    error = refused["response"]["body"]
    assert error["type"] == "error" and "thinking" in error["error"]["message"]


def test_cancel_keeps_what_finished_and_reports_the_rest(client):
    lines = list(valid_lines(30, "cancel").values())
    uploaded = client.files.create(file=("cancel.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts.completed + counts.failed == counts.total == 30 and counts.failed > 0
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_batch_list_pages_with_after_and_limit(client):
    bad_only = client.files.create(file=("bad.jsonl", MALFORMED[0][0].encode() + b"\n"), purpose="batch")
    created = [client.batches.create(input_file_id=bad_only.id, endpoint=CHAT, completion_window="24h").id
               for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == created[0]
    every = [b.id for b in client.batches.list(limit=1)]  # the client follows the cursor itself
    assert every[:3] == created[::-1] and len(every) == len(set(every))
    assert wait_for_batch(client, created[0]).request_counts.failed == 1


def test_batch_request_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    uploaded = client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="1h")


def test_files_api(client, server):
    a = client.files.create(file=("a.jsonl", b'{"x": 1}\n'), purpose="batch")
    b = client.files.create(file=("../../etc/b.jsonl", b'{"y": 2}\n'), purpose="batch")
    assert b.filename == "b.jsonl"  # a label only; bodies live under their generated ids
    listed = [f.id for f in client.files.list()]
    assert listed.index(b.id) < listed.index(a.id)  # newest first
    assert client.files.retrieve(a.id).bytes == 9
    assert client.files.content(b.id).content == b'{"y": 2}\n'
    deleted = client.files.delete(a.id)
    assert deleted.deleted and deleted.id == a.id
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(a.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("c.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * (MAX_UPLOAD + 1)), purpose="batch")
    assert too_big.value.status_code == 413
    assert too_big.value.body["code"] == "file_too_large"  # OpenAI's error shape
    response = httpx.post(f"{server.v1}/files", files={"file": ("big.jsonl", b"y" * (MAX_UPLOAD * 3))},
                          data={"purpose": "batch"}, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    assert b.id in [f.id for f in client.files.list(purpose="batch")]
    stored = list((Path(server.log_path).parent / "state" / "batch" / "files").iterdir())
    assert not [p for p in stored if p.suffix == ".part"], "failed uploads leave nothing behind"


# --- durability: a server killed mid-job resumes it ------------------------------------------------


def test_killed_server_resumes_its_batch(start_jarvis, tmp_path):
    env = dict(JARVIS_BATCH_CONCURRENCY="2", JARVIS_LLAMA_N_PARALLEL="2")
    server = start_jarvis(tmp_path, **env)
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        valid = valid_lines(40, "crash")
        uploaded = client.files.create(file=("crash.jsonl", "\n".join(valid.values()).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
        before = wait_for_batch(client, batch.id, until=lambda b: b.request_counts.completed >= 6)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        assert before.request_counts.completed < 40, "the kill came too late to test anything"
    finally:
        server.stop()
    server = start_jarvis(tmp_path, **env)  # same state dir
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        resumed = client.batches.retrieve(batch.id)
        assert resumed.request_counts.completed >= before.request_counts.completed  # nothing committed lost
        done = wait_for_batch(client, batch.id)
        assert done.status == "completed" and done.error_file_id is None
        assert (done.request_counts.total, done.request_counts.completed) == (40, 40)
        output = read_jsonl(client.files.content(done.output_file_id).text)
        ids = [r["custom_id"] for r in output]
        assert len(ids) == len(set(ids)) == 40 and set(ids) == set(valid)  # 0 lost, 0 duplicated
        assert ids == list(valid)  # input order
    finally:
        server.stop()


# --- offline: jarvis batch run ---------------------------------------------------------------------


def test_offline_run_writes_results_and_errors(jarvis_cli, tmp_path):
    data, valid = mixed_input(10)
    source = tmp_path / "in.jsonl"
    source.write_bytes(data)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    result = jarvis_cli("batch", "run", str(source), "-o", str(out), "--errors", str(err), cwd=tmp_path,
                        JARVIS_LLAMA_N_PARALLEL="2", JARVIS_BATCH_CONCURRENCY="4")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["completed"], summary["failed"]) == (19, 10, 9)
    check_results(read_jsonl(out.read_text()), read_jsonl(err.read_text()), set(valid),
                  n_malformed=len(MALFORMED))
    assert not list(tmp_path.glob("*.progress.sqlite3*")), "a finished run leaves no progress file"


def test_offline_resume_after_kill(tmp_path):
    import os

    valid = valid_lines(40, "offline")
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(valid.values()) + "\n")
    out = tmp_path / "out.jsonl"
    progress = tmp_path / "out.jsonl.progress.sqlite3"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")},
           "JARVIS_BATCH_CONCURRENCY": "1"}
    process = subprocess.Popen([sys.executable, "-m", "jarvis", "batch", "run", str(source), "-o", str(out)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed: dict[str, str] = {}
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and len(committed) < 5 and process.poll() is None:
            time.sleep(0.2)
            if progress.exists():
                try:
                    with sqlite3.connect(f"file:{progress}?mode=ro", uri=True) as db:
                        committed = {c: json.loads(r)["id"] for c, r in
                                     db.execute("SELECT custom_id, record FROM results")}
                except sqlite3.OperationalError:
                    pass  # the schema is not there yet
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert 5 <= len(committed) < 40, f"killed after {len(committed)} lines"
    assert not out.exists()
    result = subprocess.run([sys.executable, "-m", "jarvis", "batch", "run", str(source), "-o", str(out),
                             "--resume"], cwd=tmp_path, env={**env, "JARVIS_BATCH_CONCURRENCY": "4",
                                                             "JARVIS_LLAMA_N_PARALLEL": "2"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = read_jsonl(out.read_text())
    ids = [r["custom_id"] for r in output]
    assert ids == list(valid), "every line once, in input order"
    kept = {r["custom_id"]: r["id"] for r in output if r["custom_id"] in committed}
    assert kept == committed, "results committed before the kill were kept, not run again"
    assert all(ChatCompletion.model_validate(r["response"]["body"]) for r in output)
