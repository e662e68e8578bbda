"""`POST /v1/embeddings` end to end: a real server per engine, the embedded model, the official `openai` client.

Engines: llama.cpp, transformers, vLLM (the session's server; its pooling engine starts on the first request)
and the upstream engine (a Jarvis in front of this module's llama.cpp Jarvis). Every local engine pools the
same way (mean of the final hidden state, L2-normalised), so hf and vLLM, which run the same float32 weights,
agree to 0.999 cosine, and llama.cpp (Q4_K_M weights) comes close. The retrieval rate of this 270M base
model's vectors is measured and printed, and held above chance.
"""

from __future__ import annotations

import base64
import math

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
CONTEXT = 1024  # the largest of the shared servers' (conftest's serve_engine; the vLLM server's is smaller)
ENGINES = ["llama_cpp", "hf", "vllm", "openai"]
LOCAL = ["llama_cpp", "hf", "vllm"]
TEXTS = ["The capital of France is Paris.", "hi", "A long sentence about the weather: it rained all day in "
         "London, and the streets were full of umbrellas and hurried people going home.", "1 + 1 = 2"]
PAIRS = [  # (query, its passage): the retrieval check
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How many legs does a spider have?", "Spiders are arachnids with eight legs."),
    ("What do bees make?", "Honey bees produce honey from the nectar of flowers."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet is a tragedy written by William Shakespeare."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is known as the red planet?", "Mars is often called the red planet because of its color."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    ("How do plants make food?", "Plants use photosynthesis to turn sunlight into sugar."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What instrument has 88 keys?", "A standard piano has 88 black and white keys."),
]


@pytest.fixture(scope="module")
def servers(shared_engine_server):
    """`servers(engine, request)`: the session's server of that engine (shared with other read-only modules)."""
    return lambda engine, request: shared_engine_server(engine)


@pytest.fixture(scope="module")
def tokenizer(embedded_gguf):
    from llama_cpp import Llama

    vocab = Llama(str(embedded_gguf), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=True, special=True)


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600)


_vectors: dict[tuple[str, tuple[str, ...]], list[list[float]]] = {}


def embed(servers, request, engine: str, texts: list[str]) -> list[list[float]]:
    """The engine's vectors of `texts` (one request), kept for the cross-engine tests."""
    key = (engine, tuple(texts))
    if key not in _vectors:
        client = client_of(servers(engine, request))
        answer = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        _vectors[key] = [d.embedding for d in answer.data]
    return _vectors[key]


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("engine", ENGINES)
def test_float_and_base64_are_the_same_vector(engine, servers, request):
    np = pytest.importorskip("numpy")
    client = client_of(servers(engine, request))
    as_floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    by_default = client.embeddings.create(model=MODEL, input=TEXTS[0])  # the SDK asks for base64 and decodes it
    raw = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="base64").data[0].embedding
    assert isinstance(raw, str)
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    floats = np.array(as_floats.data[0].embedding)
    assert as_floats.object == "list" and as_floats.model == MODEL and as_floats.data[0].object == "embedding"
    assert floats.shape == (640,) and abs(np.linalg.norm(floats) - 1) < 1e-4
    assert np.abs(decoded - floats).max() < 1e-6
    assert np.abs(np.array(by_default.data[0].embedding) - floats).max() < 1e-6


@pytest.mark.parametrize("engine", ENGINES)
def test_a_list_is_embedded_as_each_input_alone_with_exact_usage(engine, servers, request, tokenizer):
    client = client_of(servers(engine, request))
    together = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in together.data] == list(range(len(TEXTS)))
    for text, item in zip(TEXTS, together.data):
        alone = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
        assert cos(alone, item.embedding) > 1 - 1e-3, (engine, text)  # llama.cpp's batched decode: ~1e-4 off
    tokens = sum(len(tokenizer(t)) for t in TEXTS)
    assert together.usage.prompt_tokens == together.usage.total_tokens == tokens


@pytest.mark.parametrize("engine", ENGINES)
def test_token_ids_embed_like_their_text(engine, servers, request, tokenizer):
    client = client_of(servers(engine, request))
    text = TEXTS[2]
    by_text = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
    ids = tokenizer(text)
    flat = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    nested = client.embeddings.create(model=MODEL, input=[ids, ids[:5]], encoding_format="float")
    assert flat.usage.prompt_tokens == len(ids) and nested.usage.prompt_tokens == len(ids) + 5
    assert cos(by_text, flat.data[0].embedding) > 0.9999
    assert cos(by_text, nested.data[0].embedding) > 0.999  # embedded beside another input


@pytest.mark.parametrize("engine", ENGINES)
def test_what_cannot_be_embedded_is_a_400_naming_the_field(engine, servers, request):
    server = servers(engine, request)

    def error(**body):
        answer = httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, **body}, timeout=120)
        return answer.status_code, answer.json()["error"]

    status, e = error(input="x", frobnicate=1)
    assert status == 400 and e["param"] == "frobnicate"
    status, e = error(input="x", dimensions=64)
    assert status == 400 and e["param"] == "dimensions" and "dimensions" in e["message"]
    for empty in ("", [], [""], [[]]):
        status, e = error(input=empty)
        assert status == 400 and e["param"] == "input", (empty, e)
    status, e = error(input="word " * (CONTEXT + 100))
    assert status == 400 and e["param"] == "input" and e["code"] == "context_length_exceeded", e
    assert "maximum context length is" in e["message"] and "JARVIS_MAX_MODEL_LEN" in e["message"]
    status, e = error(input=[[2, 10**7]])
    assert status == 400 and e["param"] == "input" and "vocabulary" in e["message"]
    status, e = error(input="x", encoding_format="int8")
    assert status == 400 and e["param"] == "encoding_format"
    status, e = httpx.post(f"{server.v1}/embeddings", json={"model": "no-such-model", "input": "x"}, timeout=60), None
    assert status.status_code == 404
    with pytest.raises(openai.BadRequestError):  # the SDK sees the same
        client_of(server).embeddings.create(model=MODEL, input="x", dimensions=8)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_declares_how_it_embeds(engine, servers, request):
    server = servers(engine, request)
    client_of(server).embeddings.create(model=MODEL, input="warm")
    described = httpx.get(f"{server.v1}/engine", timeout=30).json()["embeddings"]
    if engine == "openai":
        assert described["pooling"] == "the upstream's"
        return
    assert (described["pooling"], described["normalize"], described["dimensions"]) == ("mean", True, 640)
    if engine == "vllm":
        start = described["start"]
        print(f"\nvLLM pooling engine: started in {start['start_s']} s; process tree RSS {start['rss_before_mib']} "
              f"-> {start['rss_after_mib']} MiB; its new processes' USS {start['new_processes_uss_mib']} MiB; "
              f"KV cache {start['kv_cache_bytes']} bytes")
        assert described["running"] and start["start_s"] > 0


@pytest.mark.parametrize("engine", LOCAL)
def test_retrieval_finds_each_querys_passage_above_chance(engine, servers, request):
    queries = embed(servers, request, engine, [q for q, _ in PAIRS])
    passages = embed(servers, request, engine, [p for _, p in PAIRS])
    hits = sum(max(range(len(PAIRS)), key=lambda j: cos(q, passages[j])) == i for i, q in enumerate(queries))
    rate = hits / len(PAIRS)
    print(f"\n{engine}: each query's nearest passage is its own for {hits}/{len(PAIRS)} ({rate:.0%}; chance 10%)")
    assert rate > 1 / len(PAIRS)


def test_hf_and_vllm_agree_and_llama_cpp_comes_close(servers, request):
    texts = TEXTS + [p for _, p in PAIRS]
    hf, vllm, llama = (embed(servers, request, e, texts) for e in ("hf", "vllm", "llama_cpp"))
    hf_vllm = [cos(a, b) for a, b in zip(hf, vllm)]
    llama_hf = [cos(a, b) for a, b in zip(llama, hf)]
    print(f"\ncosine hf vs vllm: min {min(hf_vllm):.6f} mean {sum(hf_vllm) / len(texts):.6f}; "
          f"llama.cpp (Q4_K_M) vs hf: min {min(llama_hf):.4f} mean {sum(llama_hf) / len(texts):.4f}")
    assert min(hf_vllm) >= 0.999
    assert min(llama_hf) >= 0.9


def test_langchain_openai_embeddings_work_unchanged(servers, request):
    from langchain_openai import OpenAIEmbeddings

    server = servers("llama_cpp", request)
    embeddings = OpenAIEmbeddings(base_url=server.v1, api_key="unused", model=MODEL,
                                  check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(TEXTS[:2])
    query = embeddings.embed_query(TEXTS[0])
    direct = embed(servers, request, "llama_cpp", TEXTS)
    assert len(documents) == 2 and len(documents[0]) == 640
    assert cos(documents[0], direct[0]) > 0.999 and cos(documents[1], direct[1]) > 0.999
    assert cos(query, direct[0]) > 0.999


def test_telemetry_counts_embedding_requests(servers, request):
    server = servers("llama_cpp", request)
    client_of(server).embeddings.create(model=MODEL, input=["one", "two"])
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    counted = [line for line in metrics.splitlines()
               if line.startswith("jarvis_requests_total{") and 'operation="embeddings"' in line
               and 'status="ok"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1, metrics[:2000]
