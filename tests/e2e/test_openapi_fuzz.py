"""Jarvis's own OpenAPI schema, fuzzed against a real server: no 5xx, and every response is what the schema says.

Schemathesis generates requests for every operation in /schema/openapi.json (the
core's and the plugins'), valid and invalid, and checks each response: no server
error, a documented status code, the documented content type and headers, and a
body that validates against the documented schema (OpenAI's error object for
errors). Schema-valid requests that the server still refuses for a reason the
schema cannot express (an unknown model, the context window, the max_tokens cap)
are allowed, so the positive-acceptance check is not among them. The server has
API keys (a user key and an admin key) and the fuzzer sends the admin key, so
every operation, the admin-only ones too, is reached past the access guard.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

ADMIN_KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(jarvis_server, adapter_root):
    # a small max_tokens cap keeps thousands of generated requests cheap on a real engine
    return jarvis_server(JARVIS_MAX_TOKENS_CAP="4", JARVIS_MAX_MODEL_LEN="512", JARVIS_LLAMA_N_THREADS="1",
                         JARVIS_ADAPTER_ROOT=str(adapter_root), JARVIS_API_KEYS="fuzz-user-key",
                         JARVIS_ADMIN_KEYS=ADMIN_KEY)


def test_every_operation_keeps_its_contract(fuzzed_server):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: set[int] = set()
    for operation in operations:  # one Hypothesis run per operation, so a failure names its operation

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)
        def keeps_contract(case):
            response = case.call_and_validate(base_url=fuzzed_server.base_url, checks=CHECKS, timeout=60,
                                              headers=AUTH)
            statuses.add(response.status_code)

        keeps_contract()
    assert 200 in statuses and 401 not in statuses, statuses  # the key got every request past the guard


def test_the_server_still_serves_after_the_fuzzing(fuzzed_server):
    import openai

    client = openai.OpenAI(base_url=fuzzed_server.v1, api_key=ADMIN_KEY, max_retries=0)
    assert client.completions.create(model="gemma-3-270m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert fuzzed_server.health()["status"] == "ready"


def test_every_json_body_refuses_an_unknown_field_by_name(fuzzed_server):
    """OpenAI answers a field it does not know with a 400 naming it; so does every Jarvis operation that takes
    a JSON object (the core's and the plugins', read from the schema), even in an otherwise empty body."""
    import httpx

    spec = httpx.get(f"{fuzzed_server.base_url}/schema/openapi.json", timeout=30).json()
    checked = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            content = (operation.get("requestBody") or {}).get("content", {})
            if "application/json" not in content:
                continue
            url = fuzzed_server.base_url + path.replace("{", "").replace("}", "")  # path parameters: any value
            for body in ({"frobnicate": 1}, {"frobnicate": 1, "model": "gemma-3-270m"}):
                answer = httpx.request(method.upper(), url, json=body, timeout=60, headers=AUTH)
                assert answer.status_code == 400, (method, path, answer.status_code, answer.text)
                if path.startswith("/api/v1"):  # the Tinker API answers in its own shape
                    assert "frobnicate" in answer.json()["detail"], (method, path, answer.text)
                elif path.startswith("/v1/messages"):  # and Anthropic's in its own
                    assert answer.json()["type"] == "error", (method, path, answer.text)
                    assert "frobnicate" in answer.json()["error"]["message"], (method, path, answer.text)
                else:
                    assert answer.json()["error"]["param"] == "frobnicate", (method, path, answer.text)
            checked.append(f"{method.upper()} {path}")
    assert len(checked) >= 6 and {"POST /api/v1/create_model", "POST /v1/messages"} <= set(checked), checked
