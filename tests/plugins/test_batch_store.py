"""Batch pieces that need no model: line validation, the job store's once-per-line results, file confinement."""

from __future__ import annotations

import json

import pytest

from jarvis.errors import InvalidRequest
from jarvis.plugins.batch.lines import first_endpoint, parse_input, validate_line_body
from jarvis.plugins.batch.store import BatchJobStore

CHAT = "/v1/chat/completions"


def line(custom_id, url=CHAT, method="POST", **body):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}})


def test_each_line_is_judged_on_its_own():
    data = "\n".join([line("a"), "", "[1, 2]", "{oops", line(""), line("a"), line("b", method="GET"),
                      line("c", url="/v1/moderations"), line("d", url="/v1/completions"), line("e")]).encode()
    data += b"\n\xff\xfe\n"
    parsed = parse_input(data, CHAT)
    codes = {p.line: (p.error or {}).get("code") for p in parsed}
    assert codes == {1: None, 3: "invalid_json", 4: "invalid_json", 5: "missing_custom_id",
                     6: "duplicate_custom_id", 7: "invalid_method", 8: "invalid_url", 9: "mismatched_url",
                     10: None, 11: "invalid_encoding"}  # blank line 2 is skipped, line numbers are the file's
    assert "line 1" in parsed[4].error["message"]  # the duplicate names the line it repeats
    assert first_endpoint(data) == CHAT


def test_a_malformed_line_still_owns_its_custom_id():
    parsed = parse_input("\n".join([line("x", method="GET"), line("x")]).encode(), CHAT)
    assert [p.error["code"] for p in parsed] == ["invalid_method", "duplicate_custom_id"]


def test_bodies_are_validated_like_the_route():
    ok = parse_input(line("a", max_tokens=4).encode(), CHAT)[0]
    assert validate_line_body(ok, CHAT).max_tokens == 4
    with pytest.raises(InvalidRequest) as bad:
        validate_line_body(parse_input(line("a", temperature=9).encode(), CHAT)[0], CHAT)
    assert bad.value.param == "temperature"
    with pytest.raises(InvalidRequest) as streaming:
        validate_line_body(parse_input(line("a", stream=True).encode(), CHAT)[0], CHAT)
    assert streaming.value.code == "stream_not_supported"


def test_a_line_that_ran_twice_is_recorded_once(tmp_path):
    store = BatchJobStore(tmp_path)
    batch_id = store.create_batch(endpoint=CHAT, completion_window="24h", input_path=tmp_path / "in.jsonl")
    assert store.record_result(batch_id, 3, "c", True, {"custom_id": "c", "run": 1})
    assert store.record_result(batch_id, 1, "a", False, {"custom_id": "a"})
    assert not store.record_result(batch_id, 3, "c", True, {"custom_id": "c", "run": 2})
    store.close()
    store = BatchJobStore(tmp_path)  # what a restarted process sees
    assert store.counts(batch_id) == (1, 1) and store.done_lines(batch_id) == {1, 3}
    out = tmp_path / "all.jsonl"
    assert store.export(batch_id, None, out) == 2
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a", "c"]  # input order
    assert json.loads(out.read_text().splitlines()[1])["run"] == 1


def test_file_bodies_stay_inside_the_store(tmp_path):
    store = BatchJobStore(tmp_path / "batch")
    for file_id in ("file-abc", "../../etc/passwd", "/abs/path", "file-\x00x"):
        path = store.file_path(file_id)
        assert path.parent == store.files_dir and path.resolve().is_relative_to(store.files_dir.resolve())


def test_batch_status_timestamps_and_paging(tmp_path):
    store = BatchJobStore(tmp_path)
    ids = [store.create_batch(endpoint=CHAT, completion_window="24h", input_file_id="f", expires_in_s=60)
           for _ in range(3)]
    store.set_status(ids[0], "in_progress", total=5)
    store.set_status(ids[0], "in_progress")
    batch = store.get_batch(ids[0])
    assert batch["status"] == "in_progress" and batch["in_progress_at"] and batch["expires_at"]
    assert batch["request_counts"] == {"total": 5, "completed": 0, "failed": 0}
    page, more = store.list_batches(None, 2)
    assert [b["id"] for b in page] == ids[::-1][:2] and more
    page, more = store.list_batches(page[-1]["id"], 2)
    assert [b["id"] for b in page] == [ids[0]] and not more
