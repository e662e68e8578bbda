"""Every key sees only its own data, end to end: one real server (llama.cpp, the embedded model) with two
user keys and an admin key, driven by the official `openai` SDK over every stored-object route.

Key B gets the 404 of an unknown id for each of A's responses (retrieve, input items, delete, and
`previous_response_id`, streamed or not), files (retrieve, content, delete, as a batch's input) and
batches (retrieve, cancel, their result files); lists and their pages hold only the caller's objects;
the admin key sees both. Admin routes answer a user key 403 naming the scope. The server was started
over a state dir holding stores from before owners were recorded: their rows are kept, visible to the
admin only. Each refusal is an audit line and a counted event, and no key appears in the log. Last, a
server killed with SIGKILL under concurrent stored responses and uploads keeps, after its restart,
every object it answered 200 for, with its owner.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
CHAT = "/v1/chat/completions"
KEY_A, KEY_B, ADMIN = "sk-alice-3f9a1c", "sk-bob-77e2d0", "sk-ops-c4b8e5"
KEYS = dict(JARVIS_API_KEYS=f"{KEY_A},{KEY_B}", JARVIS_ADMIN_KEYS=ADMIN)
LEGACY_RESPONSE, LEGACY_FILE, LEGACY_BATCH = "resp_legacy0001", "file-legacy0001", "batch_legacy0001"


def seed_legacy_stores(state: Path) -> None:
    """Stores as a server wrote them before owners were recorded: no owner column."""
    state.mkdir(parents=True)
    with sqlite3.connect(state / "responses.sqlite3") as db:
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, "
                   "previous_response_id TEXT, response TEXT NOT NULL, context TEXT NOT NULL)")
        response = {"id": LEGACY_RESPONSE, "object": "response", "created_at": 1, "status": "completed",
                    "model": MODEL, "output": [], "previous_response_id": None}
        db.execute("INSERT INTO responses VALUES (?, 1, NULL, ?, ?)",
                   (LEGACY_RESPONSE, json.dumps(response), json.dumps([])))
    (state / "batch").mkdir()
    with sqlite3.connect(state / "batch" / "batch.sqlite3") as db:
        db.execute("CREATE TABLE files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, "
                   "bytes INTEGER NOT NULL, created_at INTEGER NOT NULL)")
        db.execute("INSERT INTO files VALUES (?, 'old.jsonl', 'batch', 3, 1)", (LEGACY_FILE,))
        db.execute("CREATE TABLE batches (id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT, "
                   "input_path TEXT, input_sha256 TEXT, completion_window TEXT NOT NULL, status TEXT NOT NULL, "
                   "created_at INTEGER NOT NULL, expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER,"
                   " completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, "
                   "cancelled_at INTEGER, output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL "
                   "DEFAULT 0, errors TEXT, metadata TEXT)")
        db.execute("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at) "
                   "VALUES (?, ?, ?, '24h', 'failed', 1)", (LEGACY_BATCH, CHAT, LEGACY_FILE))


@pytest.fixture(scope="module")
def server(start_jarvis, tmp_path_factory):
    folder = tmp_path_factory.mktemp("owned")
    seed_legacy_stores(folder / "state")
    running = start_jarvis(folder, **KEYS, JARVIS_ENGINE_INFO_ACCESS="admin", JARVIS_TELEMETRY_METRICS_ACCESS="key",
                           JARVIS_MAX_MODEL_LEN="512", JARVIS_LLAMA_N_PARALLEL="2", JARVIS_BATCH_CONCURRENCY="2")
    yield running
    running.stop()


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def a(server):
    return sdk(server, KEY_A)


@pytest.fixture(scope="module")
def b(server):
    return sdk(server, KEY_B)


@pytest.fixture(scope="module")
def admin(server):
    return sdk(server, ADMIN)


def hidden(call, *args, **kwargs) -> openai.NotFoundError:
    """`call` answers the 404 of an unknown id, in OpenAI's shape."""
    with pytest.raises(openai.NotFoundError) as info:
        call(*args, **kwargs)
    assert info.value.status_code == 404 and info.value.body["type"] == "not_found_error"
    return info.value


def respond(client: openai.OpenAI, text: str, **kwargs):
    return client.responses.create(model=MODEL, input=text, max_output_tokens=2, temperature=0, **kwargs)


def batch_file(client: openai.OpenAI, name: str, lines: int = 1):
    body = "\n".join(json.dumps({"custom_id": f"{name}-{i}", "method": "POST", "url": CHAT, "body": {
        "model": MODEL, "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 2}})
        for i in range(lines))
    return client.files.create(file=(f"{name}.jsonl", body.encode() + b"\n"), purpose="batch")


def test_a_response_and_its_conversation_are_the_creators_only(a, b, admin):
    first = respond(a, [{"role": "user", "content": "secret of A: 1234"},
                        {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "and 5678"}])
    assert a.responses.retrieve(first.id).id == first.id
    hidden(b.responses.retrieve, first.id)
    hidden(b.responses.input_items.list, first.id)
    missing = hidden(respond, b, "What was the secret?", previous_response_id=first.id)
    assert missing.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):  # streamed: refused before the first event
        with b.responses.stream(model=MODEL, input="And now?", max_output_tokens=2,
                                previous_response_id=first.id) as events:
            list(events)
    hidden(b.responses.delete, first.id)
    assert a.responses.retrieve(first.id).id == first.id, "B's delete deleted nothing"

    follow_up = respond(a, "What was the secret?", previous_response_id=first.id)  # A continues its own
    pages = list(a.responses.input_items.list(follow_up.id, limit=1, order="asc"))  # the SDK follows `after`
    texts = [item.content[0].text for item in pages if item.type == "message" and item.role == "user"]
    assert texts == ["secret of A: 1234", "and 5678", "What was the secret?"]
    hidden(b.responses.input_items.list, follow_up.id, limit=1)

    assert admin.responses.retrieve(first.id).id == first.id  # the admin sees every key's objects
    assert len(list(admin.responses.input_items.list(follow_up.id))) == len(pages)
    own = respond(b, "B's own question")
    assert b.responses.retrieve(own.id).id == own.id
    hidden(a.responses.retrieve, own.id)
    b.responses.delete(own.id)
    hidden(b.responses.retrieve, own.id)


def test_files_are_the_uploaders_only_and_lists_page_through_ones_own(a, b, admin):
    mine = [batch_file(a, f"a{i}").id for i in range(3)]
    theirs = batch_file(b, "b0").id
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        hidden(call, mine[0])
    assert a.files.content(mine[0]).content.startswith(b'{"custom_id": "a0-0"')

    first = a.files.list(limit=2)
    assert [f.id for f in first.data] == mine[::-1][:2] and first.has_more
    assert [f.id for f in a.files.list(limit=2, after=first.data[-1].id).data] == [mine[0]]
    assert [f.id for f in a.files.list(limit=1)] == mine[::-1]  # the SDK follows the cursor: A's only
    assert [f.id for f in b.files.list()] == [theirs]
    assert [f.id for f in b.files.list(after=mine[1])] == [theirs]  # A's id is no anchor for B
    everyone = [f.id for f in admin.files.list()]
    assert set(mine) | {theirs, LEGACY_FILE} <= set(everyone)
    assert admin.files.retrieve(mine[1]).id == mine[1]
    assert a.files.delete(mine[2]).deleted


def test_batches_and_their_result_files_are_the_creators_only(a, b, admin):
    uploaded = batch_file(a, "job", lines=2)
    with pytest.raises(openai.NotFoundError) as info:  # B cannot run a batch over A's file
        b.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    assert info.value.body["param"] == "input_file_id"
    batch = a.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    hidden(b.batches.retrieve, batch.id)
    hidden(b.batches.cancel, batch.id)
    assert batch.id not in [x.id for x in b.batches.list()]
    assert [x.id for x in a.batches.list(limit=1)][:1] == [batch.id]
    assert batch.id in [x.id for x in admin.batches.list(limit=1)]

    deadline = time.monotonic() + 120
    while (done := a.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, done
        time.sleep(0.2)
    assert done.status == "completed" and done.request_counts.completed == 2
    hidden(b.files.content, done.output_file_id)  # the results are the batch owner's
    assert [json.loads(x)["custom_id"] for x in a.files.content(done.output_file_id).text.splitlines()] == \
        ["job-0", "job-1"]
    assert done.output_file_id in [f.id for f in a.files.list(purpose="batch_output")]
    assert admin.files.content(done.output_file_id).content == a.files.content(done.output_file_id).content


def test_a_batchs_stored_responses_are_its_owners(a, b):
    line = {"custom_id": "r0", "method": "POST", "url": "/v1/responses",
            "body": {"model": MODEL, "input": "Say hi", "max_output_tokens": 2}}
    uploaded = a.files.create(file=("responses.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    batch = a.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    deadline = time.monotonic() + 120
    while (done := a.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, done
        time.sleep(0.2)
    stored = json.loads(a.files.content(done.output_file_id).text)["response"]["body"]["id"]
    assert a.responses.retrieve(stored).id == stored
    hidden(b.responses.retrieve, stored)


def test_objects_from_before_owners_are_the_admins(a, admin):
    hidden(a.responses.retrieve, LEGACY_RESPONSE)
    hidden(a.files.retrieve, LEGACY_FILE)
    hidden(a.batches.retrieve, LEGACY_BATCH)
    assert admin.responses.retrieve(LEGACY_RESPONSE).id == LEGACY_RESPONSE
    assert admin.files.retrieve(LEGACY_FILE).filename == "old.jsonl"
    assert admin.batches.retrieve(LEGACY_BATCH).status == "failed"


def test_anthropic_clients_authenticate_with_x_api_key_and_get_anthropics_401(server):
    import anthropic

    ask = dict(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    good = anthropic.Anthropic(base_url=server.base_url, api_key=KEY_A, max_retries=0)  # sends X-API-Key
    assert good.messages.create(**ask).usage.output_tokens >= 1
    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token=KEY_B, max_retries=0)  # Authorization: Bearer
    assert bearer.messages.count_tokens(model=MODEL, messages=ask["messages"]).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=server.base_url, api_key="sk-wrong", max_retries=0).messages.create(**ask)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert "X-API-Key" in refused.value.body["error"]["message"]


def test_admin_routes_need_the_admin_scope(server):
    def post(path: str, key: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server.v1}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    for path, body in (("/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}),
                       ("/unload_lora_adapter", {"lora_name": "x"})):
        refused = post(path, KEY_A, body)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "insufficient_scope"
        assert "`admin` scope" in error["message"] and path in error["message"]
    assert post("/unload_lora_adapter", ADMIN, {"lora_name": "x"}).status_code == 404  # past the guard: no such
    assert httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "x"}).status_code == 401

    engine = {key: httpx.get(f"{server.v1}/engine", headers={"Authorization": f"Bearer {key}"}).status_code
              for key in (KEY_A, ADMIN)}
    assert engine == {KEY_A: 403, ADMIN: 200}  # JARVIS_ENGINE_INFO_ACCESS=admin
    # Anthropic's and Tinker's SDKs send X-API-Key
    assert httpx.get(f"{server.v1}/engine", headers={"X-API-Key": ADMIN}).status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 401  # JARVIS_TELEMETRY_METRICS_ACCESS=key
    metrics = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {KEY_B}"})
    assert metrics.status_code == 200
    counted = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.text.splitlines()
               if line.startswith("jarvis_audit_events_total")}
    assert counted['jarvis_audit_events_total{kind="admin_scope",outcome="denied"}'] >= 2
    assert counted['jarvis_audit_events_total{kind="admin_scope",outcome="allowed"}'] >= 2
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # health stays open


def test_refusals_are_audited_without_any_key(a, b, server):
    response = respond(a, "audited")
    hidden(b.responses.retrieve, response.id)
    deadline = time.monotonic() + 10
    while f"target={response.id}" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    line = next(x for x in server.log().splitlines() if f"target={response.id}" in x)
    assert "outcome=hidden" in line and "actor=key-" in line and "owner=key-" in line
    log = server.log()
    assert "outcome=denied" in log and "scope=admin" in log
    assert not any(key in log for key in (KEY_A, KEY_B, ADMIN)), "a key reached the log"


# --- durability with owners: SIGKILL under load, then a restart -------------------------------------


def test_a_killed_server_keeps_every_object_it_answered_200_for_with_its_owner(start_jarvis, tmp_path):
    env = dict(**KEYS, JARVIS_MAX_MODEL_LEN="512", JARVIS_LLAMA_N_PARALLEL="2")
    server = start_jarvis(tmp_path, **env)
    acknowledged: list[tuple[str, str, str]] = []  # (kind, id, key) that got a 200
    stop = threading.Event()

    def load(key: str, kind: str) -> None:
        client = sdk(server, key)
        i = 0
        while not stop.is_set():
            try:
                if kind == "response":
                    made = respond(client, f"{key} question {i}").id
                else:
                    made = client.files.create(file=(f"f{i}.jsonl", b'{"n": %d}\n' % i), purpose="batch").id
            except (openai.APIConnectionError, openai.APIStatusError):
                return  # the server is gone: whatever never got its 200 promised nothing
            acknowledged.append((kind, made, key))
            i += 1

    workers = [threading.Thread(target=load, args=(key, kind)) for key in (KEY_A, KEY_B)
               for kind in ("response", "file")]
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        while sum(k == "response" for k, _, _ in acknowledged) < 6 or len(acknowledged) < 12:
            assert time.monotonic() < deadline, acknowledged
            time.sleep(0.05)
        server.process.send_signal(signal.SIGKILL)  # while requests are in flight
        server.process.wait()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
        server.stop()
    promised = list(acknowledged)
    server = start_jarvis(tmp_path, **env)  # the same state dir
    try:
        clients = {KEY_A: sdk(server, KEY_A), KEY_B: sdk(server, KEY_B)}
        for kind, made, key in promised:
            owner, other = clients[key], clients[KEY_B if key == KEY_A else KEY_A]
            fetch = owner.responses.retrieve if kind == "response" else owner.files.retrieve
            assert fetch(made).id == made
            hidden(other.responses.retrieve if kind == "response" else other.files.retrieve, made)
    finally:
        server.stop()
