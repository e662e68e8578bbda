"""Embeddings without a server: the request's input shapes and errors, base64 as OpenAI encodes it, the checks
`prepare_embeddings` makes (on the fake engine, named as such: the subject is the runtime's rules), and the
pooling and batching arithmetic of the llama.cpp and transformers engines."""

from __future__ import annotations

import base64
import json
import math

import pytest
from fake_engine import FakeEngine

from jarvis.bodies import parse_body
from jarvis.embeddings import embedding_method, prepare_embeddings
from jarvis.engine import EmbeddingRequest
from jarvis.errors import InvalidRequest
from jarvis.prepare import ServedModel
from jarvis.protocol_embeddings import MAX_INPUTS, EmbeddingsRequest
from jarvis.serving.embeddings import decode_vector, encode_vector


def body(**fields) -> EmbeddingsRequest:
    return parse_body(json.dumps({"model": "m", **fields}).encode(), EmbeddingsRequest)


def refused(**fields) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        body(**fields)
    return caught.value


def test_every_input_shape_becomes_a_list_of_inputs():
    assert body(input="hi").inputs == ["hi"]
    assert body(input=["a", "b"]).inputs == ["a", "b"]
    assert body(input=[2, 5, 7]).inputs == [[2, 5, 7]]
    assert body(input=[[2, 5], [9]]).inputs == [[2, 5], [9]]
    assert body(input="x").encoding_format == "float"
    assert body(input="x", user="someone").user == "someone"


@pytest.mark.parametrize("value, words", [
    ("", "empty string"), ([], "empty list"), (["a", ""], "input[1] is an empty string"),
    ([[1], []], "input[1] is an empty token-id list"), ([1, "a"], "must be a string"), ([True], "must be a string"),
    ([-1], "must be a string"), ({"text": "a"}, "must be a string"), (["x"] * (MAX_INPUTS + 1), "at most 2048"),
])
def test_a_bad_input_is_a_400_naming_input(value, words):
    error = refused(input=value)
    assert error.param == "input" and words in error.message, error.message


def test_unknown_fields_and_bad_options_are_named():
    assert refused(input="x", frobnicate=1).param == "frobnicate"
    assert refused(input="x", encoding_format="int8").param == "encoding_format"
    assert refused(input="x", dimensions=0).param == "dimensions"
    assert refused(input="x", model="").param == "model"


def test_base64_is_little_endian_float32_as_the_sdk_decodes_it():
    np = pytest.importorskip("numpy")
    vector = [0.5, -1.25, 3.0e-8, 1.0 / 3.0]
    encoded = encode_vector(vector, "base64")
    assert isinstance(encoded, str) and len(base64.b64decode(encoded)) == 16
    as_sdk = np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist()  # what openai's SDK does
    assert as_sdk == decode_vector(encoded)
    assert all(math.isclose(a, b, rel_tol=1e-7) for a, b in zip(as_sdk, vector))
    assert encode_vector(vector, "float") is vector


class EmbeddingFakeEngine(FakeEngine):
    """The fake engine (see fake_engine.py), declaring embeddings of 8 dimensions."""

    def embedding_info(self):
        return embedding_method(8)


BASE = ServedModel("fake-model", 0, 2048, "jarvis")


def prepared(inputs, engine=None, served=BASE, **kw) -> EmbeddingRequest:
    engine = engine or EmbeddingFakeEngine(None)
    return prepare_embeddings(EmbeddingRequest(model=served.id, inputs=inputs, **kw), engine, engine.model_info(),
                              served)


def test_texts_are_tokenized_with_one_bos_and_ids_taken_as_sent():
    request = prepared(["ab", "<b>ab", [1, 97, 98]])
    assert request.token_ids == [[1, 97, 98], [1, 97, 98], [1, 97, 98]]


def test_what_cannot_be_embedded_is_a_400_naming_the_field():
    def param_of(*args, **kw):
        with pytest.raises(InvalidRequest) as caught:
            prepared(*args, **kw)
        return caught.value

    assert param_of([[5, 300]]).param == "input"  # outside the 300-id vocabulary
    over = param_of(["x" * 2048])
    assert over.param == "input" and over.code == "context_length_exceeded" and "2049 tokens" in over.message
    assert param_of(["x"], dimensions=4).param == "dimensions"
    adapter = param_of(["x"], served=ServedModel("pirate", 0, 2048, "jarvis", adapter="pirate"))
    assert adapter.param == "model" and adapter.code == "adapter_not_supported"
    none = param_of(["x"], engine=FakeEngine(None))  # an engine that declares no embeddings
    assert none.code == "embeddings_not_supported" and "fake engine" in none.message


def test_llama_batches_pack_inputs_in_order_within_both_limits():
    pytest.importorskip("numpy")
    from jarvis.backends.llama_cpp.embeddings import pack_batches, unit_rows

    assert pack_batches([3, 3, 3, 5], max_tokens=8, max_sequences=8) == [[0, 1], [2, 3]]
    assert pack_batches([1] * 5, max_tokens=100, max_sequences=2) == [[0, 1], [2, 3], [4]]
    assert pack_batches([8, 1], max_tokens=8, max_sequences=4) == [[0], [1]]
    import numpy as np

    rows = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert rows.tolist() == [[0.6, 0.8], [0.0, 0.0]]


def test_hf_mean_pool_ignores_padding_and_groups_bound_the_padded_tokens():
    torch = pytest.importorskip("torch")
    from jarvis.backends.hf.embeddings import length_groups, mean_pool

    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]],  # last position is padding
                           [[0.0, 2.0], [0.0, 4.0], [0.0, 6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    groups = length_groups([5, 1, 9, 2, 9], max_tokens=18)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    lengths = [5, 1, 9, 2, 9]
    assert all(len(g) * max(lengths[i] for i in g) <= 18 for g in groups)
