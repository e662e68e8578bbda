"""The Tinker wire format's protobuf parts, with the SDK's own generated schema (`tinker.proto`).

The SDK sends `forward_backward` as a `ForwardBackwardRequest` and reads the results of forward/backward
and of sampling only as `ForwardBackwardOutput` and `SampleResponse`; everything else is JSON (the SDK's
pydantic types). Tensors travel as little-endian bytes: float32 and int64 (dense or CSR).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from jarvis.plugins.tinker.futures import RequestFailed
from jarvis.plugins.tinker.trainer import Datum


@functools.cache
def sdk_proto() -> Any:
    """The SDK's generated module, imported at the first request that needs it: importing `tinker` imports
    torch (`jarvis.plugins.tinker.wire_types` says why that waits)."""
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


@functools.cache
def _dtypes() -> dict[int, Any]:
    pb = sdk_proto()
    return {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


@dataclass
class ForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    config: dict[str, float]
    forward_only: bool
    data: list[Datum]


def _tensor(t: Any, where: str) -> np.ndarray:
    """`t`: a `tinker_public_pb2.Tensor`."""
    dtype = _dtypes().get(t.dtype)
    if dtype is None:
        name = sdk_proto().DType.Name(t.dtype)
        raise RequestFailed(f"{where}: dtype {name} is not supported; send float32 or int64.")
    shape = list(t.shape)
    if t.WhichOneof("encoding") == "sparse_csr":
        csr = t.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(cols) != len(values):
            raise RequestFailed(f"{where}: a sparse tensor's indices do not fit its shape {shape}.")
        dense = np.zeros(shape, dtype=dtype)
        for row in range(shape[0]):
            dense[row, cols[crow[row]:crow[row + 1]]] = values[crow[row]:crow[row + 1]]
        return dense
    array = np.frombuffer(t.dense, dtype=dtype)
    expected = int(np.prod(shape)) if shape else array.size
    if array.size != expected:
        raise RequestFailed(f"{where}: {array.size} values do not fill the shape {shape}.")
    return array.reshape(shape or (-1,))


def decode_forward_backward(body: bytes) -> ForwardBackward:
    request = sdk_proto().ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception:
        raise RequestFailed("The forward_backward body is not a ForwardBackwardRequest protobuf.") from None
    config: dict[str, float] = dict(request.loss_fn_config)
    for key, value in request.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise RequestFailed(f"loss_fn_config[{key!r}] is text; the supported losses take numbers only.")
        config[key] = value.number
    data = []
    for i, datum in enumerate(request.data):
        tokens: list[int] = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise RequestFailed(f"data[{i}].model_input.chunks[{j}] is {kind}; Jarvis trains on text tokens only.")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4").tolist())
        inputs = {key: _tensor(t, f"data[{i}].loss_fn_inputs[{key!r}]") for key, t in datum.loss_fn_inputs.items()}
        data.append(Datum(tokens, inputs))
    return ForwardBackward(request.model_id, request.seq_id, request.loss_fn, config, request.forward_only, data)


def encode_forward_backward_output(per_datum: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    pb = sdk_proto()
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(per_datum))
    for name in per_datum[0] if per_datum else ():
        arrays = [np.ascontiguousarray(d[name], dtype="<f4") for d in per_datum]
        field = record.fields[name]
        field.dtype = pb.DTYPE_FLOAT32
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype("<i8").tobytes()
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


@dataclass
class Sequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" or "length"


def encode_sample_response(sequences: list[Sequence], prompt_logprobs: list[float] | None) -> bytes:
    pb = sdk_proto()
    out = pb.SampleResponse()
    for seq in sequences:
        s = out.sequences.add()
        s.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        s.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        s.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype="<f4").tobytes()
    return out.SerializeToString()
