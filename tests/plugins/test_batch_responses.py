"""Batch jobs of `/v1/responses` lines: through the Batch API of a real server with the official client,
and offline with `jarvis batch run`. Each line runs the same serving call as `POST /v1/responses`; a bad
body or `stream: true` is that line's error, and a stored line's response is retrievable afterwards."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from openai.types.responses import Response

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
RESPONSES = "/v1/responses"
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
          "required": ["colour"], "additionalProperties": False}


def line(custom_id: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": RESPONSES,
                       "body": {"model": MODEL, "max_output_tokens": 8, "temperature": 0, **body}})


GOOD = {
    "text": line("text", input="Name a colour."),
    "items": line("items", instructions="Answer with one word.",
                  input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]}]),
    "schema": line("schema", input="Pick a colour as JSON.", max_output_tokens=32,
                   text={"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA, "strict": True}}),
    "unstored": line("unstored", input="Name a number.", store=False),
}
BAD = {  # custom_id -> what its error must name
    "unknown-field": (line("unknown-field", input="Hi", frobnicate=1), "frobnicate"),
    "built-in-tool": (line("built-in-tool", input="Hi", tools=[{"type": "web_search_preview"}]), "tools[0].type"),
    "streaming": (line("streaming", input="Hi", stream=True), "stream"),
    "missing-previous": (line("missing-previous", input="Hi", previous_response_id="resp_missing"),
                         "previous_response_id"),
}


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(row) for row in text.splitlines() if row.strip()]


def check(output: list[dict], errors: list[dict]) -> dict[str, Response]:
    """Every good line answered once with a response object; every bad line's error names its parameter."""
    assert sorted(r["custom_id"] for r in output) == sorted(GOOD)
    responses = {}
    for record in output:
        assert record["error"] is None and record["response"]["status_code"] == 200
        response = Response.model_validate(record["response"]["body"])
        assert response.id.startswith("resp_") and response.status in ("completed", "incomplete")
        assert response.output[0].type == "message" and response.usage.output_tokens <= 32
        responses[record["custom_id"]] = response
    assert responses["schema"].status == "completed"
    jsonschema.validate(json.loads(responses["schema"].output_text), SCHEMA)
    assert responses["items"].instructions == "Answer with one word."
    assert sorted(r["custom_id"] for r in errors) == sorted(BAD)
    for record in errors:
        body = record["response"]["body"]["error"]
        assert body["param"] == BAD[record["custom_id"]][1], body
        expected = 404 if record["custom_id"] == "missing-previous" else 400
        assert record["response"]["status_code"] == expected
    return responses


def batch_input() -> bytes:
    lines = [*GOOD.values(), *(bad for bad, _ in BAD.values())]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def client(jarvis_server):
    server = jarvis_server(JARVIS_BATCH_CONCURRENCY="4", JARVIS_LLAMA_N_PARALLEL="2")
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def test_batch_of_responses_lines(client):
    uploaded = client.files.create(file=("responses.jsonl", batch_input()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=RESPONSES, completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    responses = check(read_jsonl(client.files.content(batch.output_file_id).text),
                      read_jsonl(client.files.content(batch.error_file_id).text))
    # a line's response is stored like one created over HTTP (unless it said store: false)
    assert client.responses.retrieve(responses["text"].id).output_text == responses["text"].output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(responses["unstored"].id)
    follow_up = client.responses.create(model=MODEL, input="And another?", previous_response_id=responses["items"].id,
                                        max_output_tokens=4, temperature=0)
    assert follow_up.previous_response_id == responses["items"].id


def test_offline_run_of_responses_lines(jarvis_cli, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(batch_input())
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    result = jarvis_cli("batch", "run", str(source), "-o", str(out), "--errors", str(err), cwd=tmp_path,
                        JARVIS_STATE_DIR=str(tmp_path / "state"), JARVIS_BATCH_CONCURRENCY="4",
                        JARVIS_LLAMA_N_PARALLEL="2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["completed"], summary["failed"]) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    check(read_jsonl(out.read_text()), read_jsonl(err.read_text()))
