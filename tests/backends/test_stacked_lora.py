"""Stacked per-row LoRA (backends/hf/stacked_lora.py) against PEFT's own mixed-batch routing, in process.

Two adapters of different ranks and scalings on the embedded model; one batch whose rows take adapter a,
the base model, adapter b: the stacked forward's logits equal PEFT's `adapter_names=` forward's."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter_folder(hf_folder, tmp_path_factory):
    """Adapters a (rank 4 on q_proj, v_proj) and b (rank 8 on q_proj, down_proj), random B: each changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("stacked")
    for name, rank, alpha, targets in (("a", 4, 8, ["q_proj", "v_proj"]), ("b", 8, 8, ["q_proj", "down_proj"])):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_folder),
                               LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
        torch.manual_seed(rank)
        with torch.no_grad():
            for key, weight in model.named_parameters():
                if "lora_" in key:
                    weight.normal_(0.0, 0.05)  # B not zero: the adapter changes the output
        model.save_pretrained(str(folder / name))
    return folder


@pytest.fixture(scope="module")
def two_adapters(hf_folder, adapter_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = adapter_folder
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_folder), str(folder / "a"),
                                      adapter_name="a")
    model.load_adapter(str(folder / "b"), adapter_name="b")
    return model.eval()


def test_a_mixed_batch_matches_peft_routing(two_adapters):
    from jarvis.backends.hf.stacked_lora import BASE, StackedLora

    model, rows = two_adapters, ["a", BASE, "b"]
    ids = torch.randint(1000, 5000, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        routed = model(input_ids=ids, adapter_names=rows).logits
        base = model(input_ids=ids, adapter_names=[BASE] * 3).logits
        stacked = StackedLora.build(model)
        assert stacked is not None
        try:
            with stacked.use(rows):
                mine = model(input_ids=ids).logits
            plain = model(input_ids=ids).logits  # outside `use`: the base model
        finally:
            stacked.close()
        again = model(input_ids=ids, adapter_names=rows).logits  # closed: PEFT routes the rows again
    assert not torch.allclose(routed[0], base[0], atol=1e-2) and not torch.allclose(routed[2], base[2], atol=1e-2)
    assert torch.allclose(mine, routed, atol=2e-3, rtol=1e-4), (mine - routed).abs().max()  # float rounding
    assert torch.allclose(plain, base, atol=1e-5)
    assert torch.allclose(again, routed, atol=1e-5)


def test_loads_and_unloads_change_the_slots_in_place(hf_folder, adapter_folder):
    """A stack with room for two: an unload frees its slot (zeroed), the next load takes it, the other adapter
    keeps its slot and every tensor stays where it was (what a CUDA graph replays); a third adapter does not
    fit, and `refresh` leaves the stack as it was."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jarvis.backends.hf.stacked_lora import BASE, StackedLora

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_folder), str(adapter_folder / "a"),
                                      adapter_name="a").eval()
    stacked = StackedLora.build(model, slots=2)
    assert stacked is not None and stacked.capacity == 2 and stacked.slots == {BASE: 0, "a": 1}
    model.load_adapter(str(adapter_folder / "b"), adapter_name="b")
    assert stacked.refresh() is False  # b adds LoRA layers (down_proj) that have no stack
    stacked.close()
    stacked = StackedLora.build(model, slots=2)
    assert stacked is not None and stacked.slots == {BASE: 0, "a": 1, "b": 2} and stacked.rank == 8
    where = [(a.data_ptr(), b.data_ptr()) for a, b in stacked._stacks]
    ids = torch.randint(1000, 5000, (3, 7), generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            model.delete_adapter("a")
            assert stacked.refresh() and stacked.slots == {BASE: 0, "b": 2} and stacked.generation == 1
            assert all(not view.any() for stack in stacked._stacks for view in stacked.columns(stack, 1))
            model.load_adapter(str(adapter_folder / "a"), adapter_name="c")  # a's weights, another name
            assert stacked.refresh() and stacked.slots == {BASE: 0, "b": 2, "c": 1}
            model.load_adapter(str(adapter_folder / "a"), adapter_name="d")
            assert stacked.refresh() is False and stacked.slots == {BASE: 0, "b": 2, "c": 1}  # no third slot
            model.delete_adapter("d")
            assert [(a.data_ptr(), b.data_ptr()) for a, b in stacked._stacks] == where
            with stacked.use(["c", BASE, "b"]):
                mine = model(input_ids=ids).logits
    finally:
        stacked.close()
    with torch.inference_mode():
        routed = model(input_ids=ids, adapter_names=["c", BASE, "b"]).logits
    assert torch.allclose(mine, routed, atol=2e-3, rtol=1e-4), (mine - routed).abs().max()


def test_graphs_compile_a_step_per_stack(monkeypatch):
    """With CUDA graphs the scheduler compiles one decode step for the base model and one for the adapters'
    stack; an in-place change keeps it, a new stack drops all compiled code first (torch's compiler does not
    guard forward hooks) and compiles again. Checked on CPU: torch.compile and the reset are recorded."""
    import threading
    from types import SimpleNamespace

    from jarvis.backends.hf.waves import BatchScheduler, ModelHandle
    from jarvis.engine import EngineStats

    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(f"compile {fn.__self__.name}") or fn)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))

    class Model:
        def __init__(self, name: str, adapters: bool) -> None:
            self.name = name
            if adapters:
                self.peft_config = {"a": None}

        def forward(self) -> str:
            return self.name

        def get_base_model(self) -> Model:  # PEFT's: the model under the wrapper
            return self

    base, peft = Model("base", False), Model("peft", True)
    handle = ModelHandle(base, None, torch.device("cpu"), frozenset(), threading.Lock(), EngineStats())
    s = BatchScheduler(handle, max_batch_size=4, gather_seconds=0.0, decode="graphs")
    steps = [s._graphs()]
    handle.model, handle.stacked = peft, SimpleNamespace()
    steps += [s._graphs(), s._graphs()]
    handle.stacked = handle_stack_now = SimpleNamespace()  # a load that did not fit: a new stack
    steps.append(s._graphs())
    handle.model, handle.stacked = base, None
    steps.append(s._graphs())
    assert [g.forward() for g in steps] == ["base", "peft", "peft", "peft", "base"]
    assert steps[1] is steps[2] and steps[2] is not steps[3] and steps[0] is not steps[4]
    assert steps[0].stacked is None and steps[4].stacked is None
    assert steps[3].stacked is handle_stack_now and steps[1].stacked is not handle_stack_now
    assert calls == ["compile base", "compile peft", "reset", "compile peft", "compile base"], calls
    assert s.compiles == 4


def test_what_does_not_stack_keeps_peft_routing(hf_folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jarvis.backends.hf.stacked_lora import StackedLora

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_folder),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert StackedLora.build(dora) is None


def test_a_static_wave_serves_stacked_adapters_and_takes_joiners(two_adapters, hf_folder):
    """With the adapters stacked, a static wave (what CUDA graphs replay on a GPU) serves rows of different
    adapters and takes requests for them while it decodes; each answers what it answers alone in a wave of
    its own, its adapter routed per row (the dynamic loop)."""
    import threading

    from transformers import AutoTokenizer

    from jarvis.backends.hf.stacked_lora import BASE, StackedLora
    from jarvis.backends.hf.waves import BatchScheduler, ModelHandle
    from jarvis.engine import EngineStats, PreparedRequest

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    stacked = StackedLora.build(two_adapters)
    assert stacked is not None
    handle = ModelHandle(two_adapters, tokenizer, torch.device("cpu"), frozenset({tokenizer.eos_token_id}),
                         threading.Lock(), EngineStats(), stacked=stacked)
    jobs = [("a", "The history of the ocean begins with", 20), (BASE, "Fact: the moon is", 6),
            ("b", "A short poem about autumn leaves and rain:", 6)]

    def submit(s: BatchScheduler, adapter: str, prompt: str, max_tokens: int) -> dict:
        out: dict = {"text": "", "tokens": 0, "done": threading.Event(), "started": threading.Event()}

        def emit(chunk) -> None:
            if isinstance(chunk, BaseException):
                out["error"] = chunk
                out["done"].set()
                return
            out["text"] += chunk.text
            out["tokens"] += chunk.token_count
            if out["tokens"] >= 2:
                out["started"].set()
            if chunk.finish_reason:
                out["done"].set()

        request = PreparedRequest(prompt=None, model="m", max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  adapter=None if adapter == BASE else adapter)
        s.submit(request, tokenizer(prompt)["input_ids"], emit, threading.Event())
        return out

    class Traced(BatchScheduler):  # "graphs" on a CPU: the step traced by torch's compiler (hooks included)
        def _compiled(self, forward):  # and stepped through StepGraphs' buffers, nothing captured (no CUDA)
            return torch.compile(forward, fullgraph=True, backend="eager")

    def scheduler(decode: str) -> BatchScheduler:
        s = Traced(handle, max_batch_size=4, gather_seconds=0.0, decode=decode, max_len=256)
        s.start()
        return s

    def wave(s: BatchScheduler) -> list[str]:
        first = submit(s, *jobs[0])
        assert first["started"].wait(120)
        answers = [first, *(submit(s, *job) for job in jobs[1:])]
        for answer in answers:
            assert answer["done"].wait(300) and "error" not in answer, answer
        assert s.waves == 1 and s.joined == 2, (s.waves, s.joined)
        return [a["text"] for a in answers]

    torch._dynamo.reset()
    static, graphs, dynamic = scheduler("static"), scheduler("graphs"), scheduler("dynamic")
    try:
        answers = {"static": wave(static), "graphs": wave(graphs)}
        alone = []
        for job in jobs:
            answer = submit(dynamic, *job)
            assert answer["done"].wait(300) and "error" not in answer, answer
            alone.append(answer["text"])
    finally:
        for s in (static, graphs, dynamic):
            s.stop()
        stacked.close()
        torch._dynamo.reset()
    assert answers == {"static": alone, "graphs": alone}
    assert len(set(alone)) == 3
    assert graphs._adapter_step is not None and graphs._decode_step is None
    # its prompts' prefills too ran through the stack, as PrefillGraphs, the rows past theirs as the base model
    assert graphs._adapter_prefills is not None and graphs._adapter_prefills._shapes and graphs._prefills is None
