"""The vLLM engine, in process, through vLLM's public API (`AsyncLLMEngine`, `SamplingParams`, `LoRARequest`).

vLLM schedules and batches on its own (continuous batching, paged KV cache);
this delegate only translates: a `PreparedRequest` becomes token ids plus
`SamplingParams`, each delta `RequestOutput` becomes a `GenerationChunk`, and a
client that goes away aborts its request inside vLLM. Adapters are
`LoRARequest`s added and removed at run time; `JARVIS_VLLM_MERGE_ADAPTER`
serves one adapter merged into the weights instead. Configuration and the
diagnosis of a layout that cannot work live in `config`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from jarvis import hookimpl
from jarvis.adapters import InvalidAdapter, inspect_adapter
from jarvis.backends.model_tools.folders import named_model_folder, served_model_id
from jarvis.backends.vllm.config import PREFIX, Platform, VllmSettings, plan_engine, read_model_config
from jarvis.engine import Engine, GenerationChunk, ModelInfo, PreparedRequest, TokenLogprob
from jarvis.engine_rules import skips_leading_bos
from jarvis.errors import ConfigError, InvalidRequest
from jarvis.settings import JarvisSettings, SettingsError, load_settings

log = logging.getLogger("jarvis.backends.vllm.engine")

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}
#: This engine's own settings (JARVIS_VLLM_*), for showing them without constructing the engine (`jarvis doctor`).
OPTIONS = VllmSettings


class VllmEngine(Engine):
    name = "vllm"
    tokenizer_releases_gil = True  # a Hugging Face fast tokenizer (Rust, batch encode)
    supports = frozenset({"top_k", "min_p", "repetition_penalty", "logit_bias",
                          "json_object", "json_schema", "regex", "choice"})

    def __init__(self, settings: JarvisSettings) -> None:
        super().__init__()
        self.settings = settings
        self.options: VllmSettings = load_settings(VllmSettings, prefix=PREFIX)
        self.platform = Platform.detect()
        self.model_dir = (named_model_folder(settings.model_name, "vLLM serves safetensors folders")
                          if settings.model_name is not None else None)
        self.merge_source: Path | None = None
        if self.options.merge_adapter:
            try:
                info = inspect_adapter("merge", self.options.merge_adapter, settings.adapter_dir,
                                       settings.max_lora_rank)
            except InvalidAdapter as exc:
                raise ConfigError("JARVIS_VLLM_MERGE_ADAPTER", self.options.merge_adapter, exc.message,
                                  "point it at a PEFT LoRA folder inside JARVIS_ADAPTER_ROOT") from None
            self.merge_source = Path(info.path)
        problems = self.diagnose()
        if problems:
            raise SettingsError(problems)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._special: dict[str, int] | None = None
        self._info: ModelInfo | None = None
        self._served_dir: Path | None = None
        self._loras: dict[str, Any] = {}
        self._lora_ids = itertools.count(1)
        self._engine_args: dict[str, Any] = {}
        self._embedder: Any = None  # the pooling engine of /v1/embeddings (backends/vllm/embeddings.py)

    def _base_dir(self) -> Path | None:
        if self.model_dir is not None:
            return self.model_dir
        from jarvis.backends.model_tools.convert import converted_dir, is_converted

        folder = converted_dir(self.settings.data_dir)
        return folder if is_converted(folder) else None  # not converted yet: checked once it is

    def diagnose(self, model_dir: Path | None = None) -> list[ConfigError]:
        """Every problem with this configuration on this machine (empty: nothing found)."""
        return plan_engine(self.settings, self.options, self.platform, model_dir or self._base_dir()).problems

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        folder = await asyncio.to_thread(self._model_folder)
        self.platform = Platform.detect()  # memory now, after the conversion: the CPU KV cache is sized from it
        plan = plan_engine(self.settings, self.options, self.platform, folder)
        if plan.problems:
            raise SettingsError(plan.problems)
        os.environ.update(plan.env)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, folder)
        engine_args = dict(plan.engine_args)
        try:  # vLLM reads disable_any_whitespace from the engine's config only (the request's copy is ignored);
            # xgrammar is the backend Jarvis checks schemas with, so vLLM uses the same one
            from vllm.config import StructuredOutputsConfig

            engine_args.setdefault("structured_outputs_config",
                                   StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True))
        except (ImportError, TypeError, ValueError) as exc:  # an older vLLM: its defaults
            log.info("vLLM structured outputs keep their defaults (%s)", exc)
        args = AsyncEngineArgs(**engine_args)
        # The usage context `vllm serve` passes: vLLM picks its scheduler defaults (max_num_batched_tokens,
        # max_num_seqs) by it, so Jarvis runs the engine `vllm serve` runs. Older vLLMs without it get none.
        context: dict[str, Any] = {}
        try:
            import inspect

            from vllm.usage.usage_lib import UsageContext

            if "usage_context" in inspect.signature(AsyncLLMEngine.from_engine_args).parameters:
                context["usage_context"] = UsageContext.OPENAI_API_SERVER
        except (ImportError, AttributeError, TypeError, ValueError):
            pass
        self._usage_context = context["usage_context"].value if context else None
        log.info("starting vLLM on %s (usage context %s): %s", self.platform.device, self._usage_context,
                 {k: v for k, v in plan.engine_args.items() if k not in ("model", "tokenizer")})
        try:
            self._engine = await asyncio.to_thread(lambda: AsyncLLMEngine.from_engine_args(args, **context))
        except Exception as exc:
            raise RuntimeError(f"vLLM could not start ({type(exc).__name__}: {exc}). The configuration checks "
                               f"found nothing wrong; run `jarvis doctor --engine vllm`, lower "
                               f"JARVIS_VLLM_MAX_MODEL_LEN or the memory settings, or serve with "
                               f"JARVIS_INFERENCE_ENGINE=hf") from exc
        self._served_dir = folder
        self._engine_args = {k: v for k, v in plan.engine_args.items() if k not in ("model", "tokenizer")}
        config = read_model_config(folder)
        self._info = ModelInfo(
            id=self.served_id(folder), max_model_len=plan.engine_args["max_model_len"], path=str(folder),
            architecture=config.get("model_type"), chat_template=self._tokenizer.chat_template,
            bos_token=self._tokenizer.bos_token or "", eos_token=self._tokenizer.eos_token or "",
            vocab_size=len(self._tokenizer))

    def _model_folder(self) -> Path:
        """The folder vLLM loads: the model, the embedded one converted, or either merged with an adapter."""
        base = self.model_dir
        if base is None:
            from jarvis.backends.model_tools.convert import embedded_hf_model

            base = embedded_hf_model(self.settings.data_dir)
        if self.merge_source is None:
            return base
        from jarvis.backends.model_tools.lora_merge import merged_model

        merged = merged_model(base, self.merge_source, self.settings.data_dir / "models" / "merged")
        log.info("serving %s merged into %s: %s", self.merge_source, base.name, merged)
        return merged

    def served_id(self, folder: Path) -> str:
        """The model id clients ask for: a merged adapter's name (as a LoRA-serving server names it), else the
        folder's."""
        if self.merge_source is not None:
            return self.merge_source.name
        return served_model_id(folder, embedded=self.model_dir is None)

    async def stop(self) -> None:
        if self._embedder is not None:
            embedder, self._embedder = self._embedder, None
            await embedder.shutdown()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            # vLLM's output task reads the engine process: cancelled here, on the loop, before that process
            # stops in a worker thread (otherwise it can see the process die first and log EngineDeadError)
            handler = getattr(engine, "output_handler", None)
            if isinstance(handler, asyncio.Task) and handler.get_loop() is asyncio.get_running_loop():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(engine.shutdown)

    def health_problem(self) -> str | None:
        if self._engine is not None and self._engine.errored:
            return "the vLLM engine core process is dead"
        return None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("vllm engine not started")
        return self._info

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        """What Jarvis hands vLLM (every engine argument; planned ones before a start) and what vLLM chose."""
        engine_args = self._engine_args
        if not engine_args:  # not started (`jarvis doctor`): the arguments a start would pass
            planned = plan_engine(self.settings, self.options, self.platform, self._base_dir()).engine_args
            engine_args = {k: v for k, v in planned.items() if k not in ("model", "tokenizer")}
        resolved: dict[str, Any] = {}
        config = getattr(self._engine, "vllm_config", None)  # the engine's resolved config (AsyncLLM attribute)
        if config is not None:
            for section, names in (("scheduler_config", ("max_num_batched_tokens", "max_num_seqs",
                                                          "enable_chunked_prefill")),
                                   ("cache_config", ("enable_prefix_caching", "cache_dtype", "num_gpu_blocks")),
                                   ("compilation_config", ("cudagraph_capture_sizes", "mode"))):
                part = getattr(config, section, None)
                for name in names:
                    value = getattr(part, name, None)
                    if value is not None:
                        resolved[name] = value if isinstance(value, (bool, int, float, str, list)) else str(value)
        return {"device": self.platform.device, "gpus": self.platform.gpus,
                "tensor_parallel_size": self.options.tensor_parallel_size,
                "pipeline_parallel_size": self.options.pipeline_parallel_size,
                "distributed_executor": self.options.distributed_executor or "vllm default",
                "quantization": self.options.quantization, "lora": self.options.enable_lora,
                "max_loras": self.options.max_loras,
                "merged_adapter": str(self.merge_source) if self.merge_source else None,
                "engine_args": engine_args,
                "usage_context": getattr(self, "_usage_context", None),
                "engine_resolved": resolved,
                "batching": {"kind": "continuous (vLLM scheduler, paged KV cache)"},
                "embeddings": self.embedding_info()}

    # --- embeddings ------------------------------------------------------------------------------

    def embedding_info(self) -> dict[str, Any] | None:
        from jarvis.embeddings import embedding_method

        config = read_model_config(self._served_dir) if self._served_dir is not None else {}
        size = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size") or 0
        embedder = self._embedder
        return embedding_method(int(size), **(embedder.describe() if embedder is not None else
                                              {"second_engine": "a vLLM pooling engine, started on the first "
                                                                "/v1/embeddings request", "running": False}))

    async def embed(self, request: Any) -> Any:
        from jarvis.backends.vllm.embeddings import POOLING_KV_TOKENS, VllmEmbedder
        from jarvis.engine import EmbeddingResult

        if self._engine is None or self._served_dir is None:
            raise RuntimeError("vllm engine not started")
        if self._embedder is None:
            from jarvis.backends.vllm.config import kv_bytes_per_token

            args = {**self._engine_args, "model": str(self._served_dir), "tokenizer": str(self._served_dir)}
            per_token = kv_bytes_per_token(read_model_config(self._served_dir), str(args.get("dtype")))
            max_len = self.model_info().max_model_len
            kv = per_token * max(POOLING_KV_TOKENS, 4 * max_len) if per_token else None
            if self.platform.device == "cuda":  # the generating engine holds its share: take part of the rest
                args["gpu_memory_utilization"] = round((1 - self.options.gpu_memory_utilization) * 0.9, 3)
            usage = None
            try:
                from vllm.usage.usage_lib import UsageContext

                usage = UsageContext(self._usage_context) if self._usage_context else None
            except (ImportError, ValueError):
                pass
            self._embedder = VllmEmbedder(args, kv, usage)
        ids = request.token_ids or []
        return EmbeddingResult(await self._embedder.embed(ids), sum(map(len, ids)))

    # --- generation ------------------------------------------------------------------------------

    def sampling_params(self, request: PreparedRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        max_tokens = request.max_tokens
        extra: dict[str, Any] = {}
        if request.compiled_constraint is not None:
            extra.update(request.compiled_constraint)
        # vLLM matches stop strings on text detokenized without special tokens, so a stop that is one special
        # token (a chat format's <end_of_turn>) would never match: it stops as a token id instead
        special = self._special_tokens()
        stop = [s for s in request.stop if s not in special]
        stop_ids = [special[s] for s in request.stop if s in special]
        return SamplingParams(
            max_tokens=max(1, max_tokens) if max_tokens is not None else None,  # 0 = score the prompt only
            temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            top_k=request.top_k if request.top_k > 0 else -1, min_p=request.min_p,
            repetition_penalty=request.repetition_penalty, logit_bias=request.logit_bias or None,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            stop=stop or None, stop_token_ids=stop_ids or None,
            logprobs=request.top_logprobs if request.logprobs else None,
            prompt_logprobs=request.top_logprobs if request.echo and request.logprobs else None,
            ignore_eos=request.ignore_eos, output_kind=RequestOutputKind.DELTA, **extra)

    def _special_tokens(self) -> dict[str, int]:
        """The tokenizer's special added tokens, text → id (made once)."""
        if self._special is None:
            self._special = {t.content: i for i, t in self._tokenizer.added_tokens_decoder.items() if t.special}
        return self._special

    def compile_constraint(self, constraint: Any) -> dict[str, Any]:
        """SamplingParams keywords for vLLM's structured outputs, checked first with xgrammar (vLLM's default
        backend) so a schema it cannot compile is a 400 before any stream begins. vLLM renamed the API:
        `structured_outputs=StructuredOutputsParams` (0.11 and later), `guided_decoding=GuidedDecodingParams`
        before."""
        from jarvis.backends.model_tools.grammars import grammar_of

        grammar_of(constraint)
        spec = {"json_object": {"json_object": True}, "json_schema": {"json": constraint.spec},
                "regex": {"regex": constraint.spec}, "choice": {"choice": list(constraint.spec or ())}}[constraint.kind]
        from vllm import sampling_params as sp

        if hasattr(sp, "StructuredOutputsParams"):
            return {"structured_outputs": sp.StructuredOutputsParams(**spec, disable_any_whitespace=True)}
        return {"guided_decoding": sp.GuidedDecodingParams(**spec)}  # type: ignore[attr-defined]

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import TokensPrompt

        if self._engine is None:
            raise RuntimeError("vllm engine not started")
        ids = request.prompt_token_ids or self.tokenize(request.prompt or "")
        lora = None
        if request.adapter is not None:
            lora = self._loras.get(request.adapter)
            if lora is None:
                raise InvalidRequest(f"adapter {request.adapter!r} is not loaded in vLLM", param="model")
        score_only = request.max_tokens == 0
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs ids unique per engine
        outputs = self._engine.generate(TokensPrompt(prompt_token_ids=ids), self.sampling_params(request),
                                        request_id, lora_request=lora)
        produced, first = 0, True
        async with aclosing(outputs):  # closing it aborts the request inside vLLM
            async for output in outputs:
                out = output.outputs[0]
                if score_only:
                    chunk = GenerationChunk(text="")
                else:
                    produced += len(out.token_ids)
                    chunk = GenerationChunk(text=out.text, token_count=len(out.token_ids),
                                            logprobs=self._logprobs(out.token_ids, out.logprobs, request))
                if first and request.echo and request.logprobs:
                    chunk.prompt_logprobs = self._prompt_logprobs(ids, output.prompt_logprobs, request)
                first = False
                if out.finish_reason is not None:
                    chunk.finish_reason = "length" if score_only else FINISH_REASONS.get(out.finish_reason, "stop")
                    chunk.prompt_tokens, chunk.completion_tokens = len(ids), produced
                    if isinstance(out.stop_reason, str):  # a stop string (an int is a stop token id)
                        chunk.stop_sequence = out.stop_reason
                yield chunk

    def _prompt_logprobs(self, ids: list[int], entries: Any, request: PreparedRequest) -> list[TokenLogprob]:
        """The echoed prompt's tokens; a BOS the tokenizer added is context, not prompt text."""
        scored = self._logprobs(ids, entries, request)
        return scored[1:] if skips_leading_bos(ids, self._tokenizer.bos_token_id, request.score_bos) else scored

    def _logprobs(self, token_ids: Any, entries: Any, request: PreparedRequest) -> list[TokenLogprob]:
        """vLLM's {token id: Logprob} per position → TokenLogprob (the chosen token and the top ones)."""
        if not entries:
            return []
        result = []
        for position, token_id in enumerate(token_ids):
            entry = entries[position] if position < len(entries) else None
            if entry is None:  # the first prompt token has no logprob
                text = self._tokenizer.decode([token_id])
                result.append(TokenLogprob(text, None, list(text.encode()), token_id=int(token_id)))
                continue
            chosen = entry.get(token_id)
            text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None \
                else self._tokenizer.decode([token_id])
            top = sorted(((lp.decoded_token or "", lp.logprob) for lp in entry.values()
                          if lp.rank is not None and lp.rank <= request.top_logprobs),
                         key=lambda pair: -pair[1])[:request.top_logprobs]
            result.append(TokenLogprob(text, chosen.logprob if chosen is not None else None,
                                       list(text.encode()), top, token_id=int(token_id)))
        return result

    # --- adapters --------------------------------------------------------------------------------

    async def load_adapter(self, adapter: Any) -> None:
        if not self.options.enable_lora:
            raise InvalidRequest("this vLLM engine was started without LoRA support; set "
                                 "JARVIS_VLLM_ENABLE_LORA=true and restart", code="adapters_not_supported")
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(adapter.name, next(self._lora_ids), adapter.path)
        if not await self._engine.add_lora(lora):
            raise RuntimeError(f"vLLM refused adapter {adapter.name!r}")
        self._loras[adapter.name] = lora

    async def unload_adapter(self, name: str) -> None:
        lora = self._loras.pop(name, None)
        if lora is not None:
            await self._engine.remove_lora(lora.lora_int_id)


@hookimpl
def jarvis_register_engines(register: Callable[..., None]) -> None:
    register("vllm", VllmEngine, options=OPTIONS)
