"""The Tinker service's wire format and durable state, in process: what Jarvis encodes, the SDK's own decoders
read back; what the SDK encodes, Jarvis reads; work a restart cut short answers as a server error."""

from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response  # noqa: E402

from jarvis.auth import SINGLE_USER, Principal  # noqa: E402
from jarvis.plugins.tinker import proto  # noqa: E402
from jarvis.plugins.tinker.futures import RequestFailed  # noqa: E402
from jarvis.plugins.tinker.store import RESTARTED, TinkerStore  # noqa: E402


def sdk_request(data: list[types.Datum], loss_fn: str = "ppo", config: dict | None = None) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="sess-1:train:0", seq_id=3)
    return forward_backward_request_to_proto(request).SerializeToString()


def test_the_sdks_forward_backward_request_decodes(monkeypatch):
    datum = types.Datum(model_input=types.ModelInput.from_ints([2, 7, 9]),
                        loss_fn_inputs={"target_tokens": [7, 9, 11], "logprobs": [-1.0, -2.0, -0.5],
                                        "advantages": [0.5, 0.5, -1.0]})
    decoded = proto.decode_forward_backward(sdk_request([datum, datum], config={"clip_low_threshold": 0.7}))
    assert (decoded.model_id, decoded.seq_id, decoded.loss_fn) == ("sess-1:train:0", 3, "ppo")
    assert decoded.config == {"clip_low_threshold": pytest.approx(0.7)} and not decoded.forward_only
    assert [d.tokens for d in decoded.data] == [[2, 7, 9]] * 2
    inputs = decoded.data[0].inputs
    assert inputs["target_tokens"].dtype == np.int64 and inputs["target_tokens"].tolist() == [7, 9, 11]
    assert inputs["advantages"].dtype == np.float32 and inputs["logprobs"].tolist() == [-1.0, -2.0, -0.5]


def test_malformed_requests_are_user_errors():
    with pytest.raises(RequestFailed, match="not a ForwardBackwardRequest"):
        proto.decode_forward_backward(b"\xff\xff\xff")
    message = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray([1, 2], dtype="<i4").tobytes()
    tensor = datum.loss_fn_inputs["target_tokens"]
    tensor.dtype, tensor.dense = pb.DTYPE_BFLOAT16, b"\0\0\0\0"
    with pytest.raises(RequestFailed, match="DTYPE_BFLOAT16 is not supported"):
        proto.decode_forward_backward(message.SerializeToString())
    tensor.dtype, tensor.dense = pb.DTYPE_INT64, np.asarray([1, 2, 3], dtype="<i8").tobytes()
    tensor.shape.append(2)
    with pytest.raises(RequestFailed, match="3 values do not fill the shape"):
        proto.decode_forward_backward(message.SerializeToString())


def test_what_jarvis_sends_the_sdk_reads():
    per_datum = [{"logprobs": np.array([-0.5, -1.5], dtype=np.float32),
                  "elementwise_loss": np.array([0.5, 1.5], dtype=np.float32)},
                 {"logprobs": np.array([-2.0], dtype=np.float32),
                  "elementwise_loss": np.array([2.0], dtype=np.float32)}]
    output = deserialize_forward_backward_output(proto.encode_forward_backward_output(per_datum, {"loss:sum": 4.0}))
    assert output.metrics == {"loss:sum": 4.0}
    assert [o["logprobs"].to_numpy().tolist() for o in output.loss_fn_outputs] == [[-0.5, -1.5], [-2.0]]
    sample = deserialize_sample_response(proto.encode_sample_response(
        [proto.Sequence([5, 6, 1], [-0.1, -0.2, -0.3], "stop"), proto.Sequence([7], [-1.0], "length")],
        [float("nan"), -3.0, -4.0]))
    assert [s.tokens for s in sample.sequences] == [[5, 6, 1], [7]]
    assert [s.stop_reason for s in sample.sequences] == ["stop", "length"]
    assert sample.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert sample.prompt_logprobs == [None, -3.0, -4.0]


def test_futures_a_restart_cut_short_answer_as_server_errors_and_stay_their_owners(tmp_path):
    alice, bob = Principal(owner="a" * 64), Principal(owner="b" * 64)
    store = TinkerStore(tmp_path)
    store.add_future("req-done", alice.owner, "optim_step")
    store.end_future("req-done", "done", "application/json", b"{}", None, None)
    store.add_future("req-cut", alice.owner, "forward_backward")
    store.close()
    store = TinkerStore(tmp_path)  # a restart
    cut = store.future("req-cut", alice)
    assert (cut["state"], cut["category"], cut["error"]) == ("failed", "server", RESTARTED)
    assert store.future("req-done", alice)["body"] == b"{}"
    assert store.future("req-done", bob) is None and store.future("req-done", SINGLE_USER) is not None
    store.close()


def test_the_queue_is_bounded_and_a_models_work_runs_in_order(tmp_path):
    import asyncio

    from jarvis.errors import RateLimited
    from jarvis.plugins.tinker.futures import Futures, Outcome

    store = TinkerStore(tmp_path)
    order: list[int] = []

    async def scenario() -> None:
        futures = Futures(store, max_pending=3)
        gate = asyncio.Event()

        def step(i: int):
            async def work() -> Outcome:
                if i == 0:
                    await gate.wait()  # the first request is slow: the later ones wait for it
                order.append(i)
                return Outcome(b"{}")
            return work

        ids = [await futures.submit(None, "optim_step", step(i), lane="m") for i in range(3)]
        with pytest.raises(RateLimited) as info:
            await futures.submit(None, "optim_step", step(3), lane="m")
        assert info.value.status_code == 429 and info.value.headers["Retry-After"]
        pending = await futures.wait(ids[2], SINGLE_USER, timeout=0.05)
        assert pending["state"] == "pending"
        gate.set()
        done = await futures.wait(ids[2], SINGLE_USER, timeout=5)
        assert done["state"] == "done"

    asyncio.run(scenario())
    assert order == [0, 1, 2]
    store.close()


def test_a_resent_request_runs_once(tmp_path):
    """The SDK resends a request whose answer it missed with the same seq_id: the first one answers."""
    import asyncio

    from jarvis.plugins.tinker.futures import Futures, Outcome

    store = TinkerStore(tmp_path)
    runs: list[int] = []

    async def scenario() -> None:
        futures = Futures(store, max_pending=8)

        async def work() -> Outcome:
            runs.append(1)
            return Outcome(b"{}")

        first = await futures.submit(None, "forward_backward", work, lane="m", seq_id=1)
        again = await futures.submit(None, "forward_backward", work, lane="m", seq_id=1)
        other = await futures.submit(None, "optim_step", work, lane="m", seq_id=2)
        assert first == again != other
        for request_id in (first, other):
            assert (await futures.wait(request_id, SINGLE_USER, timeout=5))["state"] == "done"
        futures.forget("m")
        assert await futures.submit(None, "forward_backward", work, lane="m", seq_id=1) != first

    asyncio.run(scenario())
    assert len(runs) == 3
    store.close()


def test_the_stored_body_schemas_are_the_installed_sdks():
    """The OpenAPI document describes the Tinker bodies from `sdk_schemas.json`, so that a server's start need
    not import the SDK (and torch with it); after an SDK upgrade this fails until the file is written again
    (`python -m jarvis.plugins.tinker.wire_types`)."""
    from jarvis.plugins.tinker.wire_types import REQUEST_TYPES, sdk_schemas, stored_schemas

    assert stored_schemas() == sdk_schemas(), "the SDK's request schemas changed: python -m " \
                                              "jarvis.plugins.tinker.wire_types writes them again"
    assert all(isinstance(getattr(types, name), type) for name in REQUEST_TYPES)


def test_a_server_starts_without_importing_the_sdk_or_torch():
    """With the Tinker routes registered, building the app and starting its plugins imports neither `tinker`
    nor torch (about 1.3 s and 190 MB of every start): the first Tinker request does."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom jarvis.app import create_app\napp = create_app()\n"
            "assert any(r.path.startswith('/api/v1') for r in app.routes), 'no Tinker routes'\n"
            "print(sorted(m for m in ('torch', 'tinker', 'transformers', 'peft') if m in sys.modules))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")},
           "JARVIS_INFERENCE_ENGINE": "openai", "JARVIS_UPSTREAM_URL": "http://127.0.0.1:9/v1",
           "JARVIS_TINKER_ENABLED": "true"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
