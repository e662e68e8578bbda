"""TinkerService: the Tinker API's operations over the trainer, the serving engine and the store.

Sessions, training models, sampling sessions, checkpoints and futures belong to the key that made them
(`jarvis.auth`); another key's id answers as unknown. Work requests (create_model, forward_backward,
optim_step, save/load weights, sampling) become futures (`futures.Futures`): training work runs in each
model's order on the trainer's thread, sampling goes through the serving engine. Sampler weights are
written inside the adapter root and loaded into the engine hot, under a name of their own, so a sampling
client samples the weights just trained without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from jarvis.auth import Principal, owner_principal
from jarvis.errors import APIError, NotFound
from jarvis.plugins.tinker import proto
from jarvis.plugins.tinker.futures import Futures, Outcome, RequestFailed
from jarvis.plugins.tinker.sampler import sample
from jarvis.plugins.tinker.settings import TinkerSettings
from jarvis.plugins.tinker.store import TinkerStore
from jarvis.plugins.tinker.trainer import LoraSpec, Trainer

log = logging.getLogger("jarvis.tinker")

#: A session that sends nothing (its client heartbeats every 10 s) for this long is gone: its training models
#: are freed when another client needs room.
ABANDONED_S = 60.0
#: Unnamed sampler snapshots (save_weights_and_get_sampling_client) kept loaded per training model.
KEEP_SNAPSHOTS = 2
#: Engines that cannot serve a LoRA of lm_head (llama.cpp: not on models whose output is the tied embedding).
NO_UNEMBED_LORA = ("llama_cpp",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PATH = re.compile(r"^tinker://(?P<model>[^/]+)/(?P<segment>weights|sampler_weights)/(?P<name>[^/]+)$")


def engine_name_of(path: str) -> str:
    """The private adapter name sampler weights are served under: unguessable without their tinker:// path."""
    return "tinker-" + hashlib.sha256(path.encode()).hexdigest()[:20]


def owner_label(owner: str | None) -> str | None:
    """The client label (`Principal.label`) of an owner's requests: the only one a private adapter serves."""
    return None if owner is None else owner_principal(owner).label


def session_of(model_id: str) -> str:
    """The session a training model belongs to (its id is `{session}:train:{n}`)."""
    return model_id.rsplit(":train:", 1)[0]


def json_outcome(body: dict[str, Any]) -> Outcome:
    return Outcome(json.dumps(body).encode())


def weights_path(model_id: str, segment: str, name: str) -> str:
    return f"tinker://{model_id}/{segment}/{name}"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise RequestFailed(f"Checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-' (no '/').")
    return name


def tinker_not_found(message: str) -> APIError:
    return NotFound(message, code="not_found")


class TinkerService:
    def __init__(self, settings: TinkerSettings, server: Any) -> None:
        self.settings = settings
        self.server = server
        self.runtime = server.runtime
        self.store = TinkerStore(settings.root(server.settings.state_path))
        self.futures = Futures(self.store, settings.max_pending)
        self._trainer: Trainer | None = None
        self._snapshots: dict[str, deque[str]] = {}  # model -> unnamed sampler snapshots, oldest first
        self._seen: dict[str, float] = {}  # session -> time.monotonic() of its last request or heartbeat

    def stop(self) -> None:
        self.futures.stop()
        if self._trainer is not None:
            self._trainer.close()

    # --- the served base ---------------------------------------------------------------------------

    @property
    def base_model(self) -> str:
        return self.runtime.model_id

    def trainer_folder(self) -> Path:
        """The transformers folder of the served model (what the trainer trains on)."""
        if self.settings.base_model is not None:
            return self.settings.base_model.expanduser()
        info = self.runtime.require_ready()
        served = Path(info.path)
        if served.is_dir() and (served / "config.json").is_file():
            return served
        from jarvis.backends.model_tools.convert import embedded_hf_model
        from jarvis.embedded_model import embedded_model_path

        data_dir = self.server.settings.data_dir
        if served.resolve() == embedded_model_path(data_dir).resolve():
            return embedded_hf_model(data_dir)
        raise RequestFailed(f"The served model {served} is not a transformers folder; set "
                            "JARVIS_TINKER_BASE_MODEL to its transformers weights to train on it.")

    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            settings = self.server.settings
            self._trainer = Trainer(self.trainer_folder, settings.device, settings.dtype,
                                    self.runtime.require_ready().max_model_len)
        return self._trainer

    def check_base(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.base_model:
            raise RequestFailed(f"base_model {base_model!r} is not served here; this server trains and samples "
                                f"{self.base_model!r}.")

    def capabilities(self) -> dict[str, Any]:
        info = self.runtime.require_ready()
        return {"supported_models": [{"model_name": self.base_model, "max_context_length": info.max_model_len,
                                      "trainable": True, "sampleable": True}]}

    # --- sessions ----------------------------------------------------------------------------------

    async def create_session(self, owner: str | None, tags: list[str]) -> str:
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        await self.store.run(self.store.add_session, session_id, owner, tags)
        self._seen[session_id] = time.monotonic()
        return session_id

    async def session(self, session_id: str, viewer: Principal) -> dict[str, Any]:
        found = await self.store.run(self.store.session, session_id, viewer)
        if found is None:
            raise tinker_not_found(f"Session {session_id!r} not found.")
        if found["finished_at"] is None:
            self._seen[session_id] = time.monotonic()
        return found

    async def finish(self, session_id: str, viewer: Principal) -> None:
        """The client is done: its training models are freed (their saved checkpoints stay)."""
        await self.session(session_id, viewer)
        await self.store.run(self.store.finish_session, session_id)
        self._seen.pop(session_id, None)
        if self._trainer is not None:
            for model_id in [m for m in self._trainer.models if session_of(m) == session_id]:
                await self.free_model(model_id)

    async def free_model(self, model_id: str) -> None:
        """Drop a training model's adapter and optimizer and unload its unnamed sampler snapshots."""
        for path in self._snapshots.pop(model_id, ()):
            await self.retire(path)
        await self.trainer.run(self.trainer.drop, model_id)
        self.futures.forget(model_id)
        log.info("tinker: training model %s freed", model_id)

    async def make_room(self) -> None:
        """Free the models of sessions gone quiet (no request or heartbeat for ABANDONED_S) when the trainer
        holds as many as it may."""
        if len(self.trainer.models) < self.settings.max_models:
            return
        now = time.monotonic()
        for model_id in list(self.trainer.models):
            if now - self._seen.get(session_of(model_id), 0.0) > ABANDONED_S:
                await self.free_model(model_id)

    # --- training models ---------------------------------------------------------------------------

    async def model(self, model_id: str, viewer: Principal) -> dict[str, Any]:
        found = await self.store.run(self.store.model, model_id, viewer)
        if found is None:
            raise tinker_not_found(f"Training model {model_id!r} not found.")
        self._seen[found["session_id"]] = time.monotonic()
        return found

    def loaded(self, model_id: str) -> None:
        if model_id not in self.trainer.models:
            raise RequestFailed(f"Training model {model_id} is not loaded (the server restarted since it was "
                                "created); create a training client from its last checkpoint "
                                "(create_training_client_from_state).")

    async def create_model(self, viewer: Principal, session_id: str, model_seq_id: int, base_model: str,
                           lora: LoraSpec, user_metadata: dict[str, Any] | None) -> str:
        await self.session(session_id, viewer)
        self.check_base(base_model)
        model_id = f"{session_id}:train:{model_seq_id}"
        engine = self.runtime.engine.name
        if lora.train_unembed and engine in NO_UNEMBED_LORA:
            raise RequestFailed(f"train_unembed=True: the {engine} engine cannot sample from a LoRA of the "
                                "unembedding (lm_head), so the trained weights could not be served. Create the "
                                "training client with train_unembed=False, or serve with "
                                "JARVIS_INFERENCE_ENGINE=hf.")
        await self.make_room()
        if len(self.trainer.models) >= self.settings.max_models:
            raise RequestFailed(f"{len(self.trainer.models)} training models are alive, the most this server "
                                f"keeps (JARVIS_TINKER_MAX_MODELS). Close a ServiceClient to free its models; a "
                                f"session that sends no heartbeat for {ABANDONED_S:.0f} s has its models freed "
                                "when room is needed.")

        async def work() -> Outcome:
            if model_id in self.trainer.models:
                return json_outcome({"model_id": model_id, "type": "create_model"})
            await self.trainer.run(self.trainer.create, model_id, lora)
            await self.store.run(self.store.add_model, model_id, viewer.owner, session_id, self.base_model,
                                 lora.public(), user_metadata)
            return json_outcome({"model_id": model_id, "type": "create_model"})

        return await self.futures.submit(viewer.owner, "create_model", work, lane=model_id, seq_id=0)

    async def info(self, model_id: str, viewer: Principal) -> dict[str, Any]:
        model = await self.model(model_id, viewer)
        folder = self.trainer.folder
        arch = json.loads((folder / "config.json").read_text()).get("model_type", "unknown")
        return {"model_id": model_id, "type": "get_info", "is_lora": True, "lora_rank": model["lora"]["rank"],
                "model_name": self.base_model, "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": arch, "model_name": self.base_model, "tokenizer_id": str(folder)}}

    async def forward_backward(self, viewer: Principal, body: bytes) -> str:
        request = proto.decode_forward_backward(body)
        await self.model(request.model_id, viewer)
        trainer = self.trainer

        async def work() -> Outcome:
            self.loaded(request.model_id)
            outputs, metrics = await trainer.run(trainer.forward_backward, request.model_id, request.data,
                                                 request.loss_fn, request.config, request.forward_only)
            await self.store.run(self.store.touch_model, request.model_id)
            return Outcome(proto.encode_forward_backward_output(outputs, metrics), "application/x-protobuf")

        kind = "forward" if request.forward_only else "forward_backward"
        return await self.futures.submit(viewer.owner, kind, work, lane=request.model_id, seq_id=request.seq_id)

    async def optim_step(self, viewer: Principal, model_id: str, params: Any, seq_id: int | None) -> str:
        await self.model(model_id, viewer)
        if getattr(params, "type", "adam") not in ("adam", "adamw"):
            raise RequestFailed(f"optimizer {params.type!r} is not supported; Jarvis trains with AdamW.")
        trainer = self.trainer

        async def work() -> Outcome:
            self.loaded(model_id)
            metrics = await trainer.run(trainer.optim_step, model_id, params.learning_rate,
                                        (params.beta1, params.beta2), params.eps, params.weight_decay,
                                        params.grad_clip_norm)
            return json_outcome({"type": "optim_step", "metrics": metrics})

        return await self.futures.submit(viewer.owner, "optim_step", work, lane=model_id, seq_id=seq_id)

    # --- weights -----------------------------------------------------------------------------------

    def _folder(self, root: Path, owner: str | None, model_id: str, segment: str, name: str) -> Path:
        owner_part = (owner or "none")[:16]
        model_part = hashlib.sha256(model_id.encode()).hexdigest()[:16]
        return root / "tinker" / owner_part / model_part / segment / name

    async def save_weights(self, viewer: Principal, model_id: str, name: str | None, overwrite: bool,
                           user_metadata: dict[str, Any] | None, seq_id: int | None) -> str:
        await self.model(model_id, viewer)
        name = check_name(name or f"state-{uuid.uuid4().hex[:8]}")
        path = weights_path(model_id, "weights", name)
        folder = self._folder(self.store.root, viewer.owner, model_id, "weights", name)

        async def work() -> Outcome:
            self.loaded(model_id)
            if folder.exists():
                if not overwrite:
                    raise RequestFailed(f"Checkpoint {path} exists; pass overwrite=True to replace it.")
                shutil.rmtree(folder)
            await self.trainer.run(self.trainer.save, model_id, folder, True)
            await self.store.run(self.store.add_checkpoint, path, viewer.owner, model_id, "training", name, folder,
                                 user_metadata)
            return json_outcome({"path": path, "type": "save_weights"})

        return await self.futures.submit(viewer.owner, "save_weights", work, lane=model_id, seq_id=seq_id)

    async def _publish(self, viewer: Principal, model_id: str, name: str) -> tuple[str, str]:
        """Save the model's adapter for sampling and load it into the serving engine: (path, engine name)."""
        path = weights_path(model_id, "sampler_weights", name)
        folder = self._folder(self.server.settings.adapter_dir, viewer.owner, model_id, "sampler_weights", name)
        if folder.exists():
            shutil.rmtree(folder)
        await self.trainer.run(self.trainer.save, model_id, folder, False)
        engine_name = engine_name_of(path)
        try:
            await self.runtime.load_adapter(engine_name, str(folder), persist=False, private=True,
                                            owner=owner_label(viewer.owner))
        except APIError as exc:
            raise RequestFailed(f"The {self.runtime.engine.name} engine could not load the sampler weights: "
                                f"{exc.message}", category="user" if exc.status_code < 500 else "server") from None
        await self.store.run(self.store.add_checkpoint, path, viewer.owner, model_id, "sampler", name, folder, None)
        return path, engine_name

    async def _retire_snapshots(self, model_id: str, path: str) -> None:
        """Keep the newest KEEP_SNAPSHOTS unnamed sampler snapshots of a model in the engine; older ones (an RL
        loop makes one a step) are unloaded and deleted, and a sampler still on one gets a clear error."""
        kept = self._snapshots.setdefault(model_id, deque())
        kept.append(path)
        while len(kept) > KEEP_SNAPSHOTS:
            await self.retire(kept.popleft())

    async def retire(self, path: str, keep_files: bool = False) -> None:
        """Sampler weights gone: out of the engine, off the checkpoint list, their folder deleted (unless
        `keep_files`)."""
        engine_name = engine_name_of(path)
        if engine_name in self.runtime.adapters:
            folder = Path(self.runtime.adapters[engine_name].path)
            await self.runtime.unload_adapter(engine_name)
            if not keep_files:
                shutil.rmtree(folder, ignore_errors=True)
        await self.store.run(self.store.delete_checkpoint, path)

    async def save_for_sampler(self, viewer: Principal, model_id: str, name: str | None,
                               sampling_session_seq_id: int | None, seq_id: int | None) -> str:
        model = await self.model(model_id, viewer)

        async def work() -> Outcome:
            self.loaded(model_id)
            if name is not None:
                path, _ = await self._publish(viewer, model_id, check_name(name))
                return json_outcome({"path": path, "type": "save_weights_for_sampler"})
            seq = sampling_session_seq_id if sampling_session_seq_id is not None else uuid.uuid4().hex[:8]
            path, engine_name = await self._publish(viewer, model_id, f"snapshot-{seq}")
            await self._retire_snapshots(model_id, path)
            sampler_id = f"{model['session_id']}:sample:{seq}"
            await self.store.run(self.store.add_sampler, sampler_id, viewer.owner, model["session_id"],
                                 self.base_model, path, engine_name)
            return json_outcome({"path": path, "sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

        return await self.futures.submit(viewer.owner, "save_weights_for_sampler", work, lane=model_id,
                                         seq_id=seq_id)

    async def checkpoint(self, path: str, viewer: Principal) -> dict[str, Any]:
        found = await self.store.run(self.store.checkpoint, path, viewer)
        if found is None or not Path(found["folder"]).is_dir():
            raise RequestFailed(f"Checkpoint {path} not found.")
        return found

    async def load_weights(self, viewer: Principal, request: Any) -> str:
        if request.model_id is not None:  # onto an existing model, in its order
            model_id = request.model_id
            await self.model(model_id, viewer)
            session_id = None
        elif request.session_id is not None and request.model_seq_id is not None:  # a new model from a checkpoint
            session_id = request.session_id
            await self.session(session_id, viewer)
            model_id = f"{session_id}:train:{request.model_seq_id}"
        else:
            raise RequestFailed("load_weights needs model_id, or session_id with model_seq_id.")

        async def work() -> Outcome:
            self.check_base(request.base_model)
            found = await self.checkpoint(request.path, viewer)
            if found["kind"] != "training" and request.optimizer:
                raise RequestFailed(f"{request.path} holds sampler weights without optimizer state; load it with "
                                    "optimizer=False, or load a checkpoint made by save_state.")
            model = await self.trainer.run(self.trainer.load, model_id, Path(found["folder"]), request.optimizer)
            if session_id is not None:
                await self.store.run(self.store.add_model, model_id, viewer.owner, session_id, self.base_model,
                                     model.lora.public(), request.user_metadata)
            return json_outcome({"path": request.path, "model_id": model_id, "type": "load_weights"})

        return await self.futures.submit(viewer.owner, "load_weights", work, lane=model_id,
                                         seq_id=request.seq_id if request.model_id is not None else 0)

    # --- sampling ----------------------------------------------------------------------------------

    async def create_sampler(self, viewer: Principal, session_id: str, seq: int, base_model: str | None,
                             model_path: str | None) -> str:
        await self.session(session_id, viewer)
        sampler_id = f"{session_id}:sample:{seq}"
        adapter = None
        if model_path is not None:
            match = _PATH.match(model_path)
            if match is None or match["segment"] != "sampler_weights":
                raise RequestFailed(f"model_path {model_path!r} is not tinker://<model>/sampler_weights/<name>.")
            found = await self.checkpoint(model_path, viewer)
            adapter = engine_name_of(model_path)
            if adapter not in self.runtime.adapters:
                await self.runtime.load_adapter(adapter, found["folder"], persist=False, private=True,
                                                owner=owner_label(found["owner"]))
        else:
            self.check_base(base_model)
        await self.store.run(self.store.add_sampler, sampler_id, viewer.owner, session_id, self.base_model,
                             model_path, adapter)
        return sampler_id

    async def sampler(self, sampler_id: str, viewer: Principal) -> dict[str, Any]:
        found = await self.store.run(self.store.sampler, sampler_id, viewer)
        if found is None:
            raise tinker_not_found(f"Sampling session {sampler_id!r} not found.")
        return found

    async def asample(self, viewer: Principal, request: Any, client: str) -> str:
        if request.sampling_session_id is None:
            raise RequestFailed("asample needs a sampling_session_id (create a sampling client first).")
        found = await self.sampler(request.sampling_session_id, viewer)
        prompt = []
        for i, chunk in enumerate(request.prompt.chunks):
            if getattr(chunk, "type", None) != "encoded_text":
                raise RequestFailed(f"prompt.chunks[{i}] is {chunk.type}; Jarvis samples from text tokens only.")
            prompt.extend(chunk.tokens)
        for field, value in (("topk_prompt_logprobs", request.topk_prompt_logprobs),
                             ("topk_sample_logprobs", request.topk_sample_logprobs),
                             ("prompt_alt_tokens_k", request.prompt_alt_tokens_k)):
            if value:
                raise RequestFailed(f"{field} is not supported by Jarvis yet; send 0.")
        if request.target_prompt_logprobs is not None or request.prompt_logprobs_last_n is not None:
            raise RequestFailed("target_prompt_logprobs and prompt_logprobs_last_n are not supported by Jarvis yet.")
        self.runtime.admit(client)
        model = found["adapter"] or self.base_model
        served = self.runtime.adapters.get(model)
        if served is not None and served.owner not in (None, client):  # an admin samples another key's weights
            client = served.owner

        async def work() -> Outcome:
            if found["adapter"] and found["adapter"] not in self.runtime.adapters:
                raise RequestFailed(f"The weights of sampling session {found['id']} were unloaded: the model has "
                                    f"saved {KEEP_SNAPSHOTS} newer snapshots since (unnamed snapshots are kept "
                                    "for the latest steps only; name them with save_weights_for_sampler(name) to "
                                    "keep them).")
            body = await sample(self.runtime, model, prompt, request.num_samples, request.sampling_params,
                                bool(request.prompt_logprobs), client)
            return Outcome(body, "application/x-protobuf")

        return await self.futures.submit(viewer.owner, "sample", work)
