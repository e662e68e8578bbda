"""`run.sh` installs what each command needs: every command the README shows is mapped to its extras.

`./run.sh --needs ARGS` prints what `./run.sh ARGS` would install and installs nothing, so these tests
read run.sh's own decision for each command line of the README (tables and code blocks).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "run.sh"


def needs(*args: str, **env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "JARVIS_INFERENCE_ENGINE"}
    done = subprocess.run([str(RUN_SH), "--needs", *args], cwd=ROOT, env={**environ, **env},
                          capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


def readme_commands() -> list[tuple[dict[str, str], list[str]]]:
    """(environment, arguments) of every `./run.sh ...` and `jarvis ...` command line in the README."""
    found = []
    text = (ROOT / "README.md").read_text()
    candidates = re.findall(r"`(\./run\.sh[^`]*)`", text)  # in tables and prose
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        candidates += [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    for line in candidates:
        line = line.split("&", 1)[0].split(">", 1)[0].split("|", 1)[0]
        words = shlex.split(line.replace("[", "").replace("]", ""))
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        placeholder = any(w.startswith("<") or w in ("ARGS", "--needs") for w in words)  # prose about run.sh
        if words and words[0] in ("./run.sh", "jarvis") and not placeholder:
            found.append((env, words[1:]))
    return found


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_this_test_walks():
    words = {args[0] if args else "" for _, args in COMMANDS}
    assert {"", "test", "serve", "doctor", "models", "train", "eval", "bench", "batch", "data"} <= words, words


@pytest.mark.parametrize("env,args", COMMANDS, ids=[" ".join(a) or "(serve)" for _, a in COMMANDS])
def test_every_readme_command_is_mapped_to_extras_that_exist(env, args):
    if args[:1] == ["test"]:
        return  # `./run.sh test` installs every extra (its own branch of run.sh)
    decision = needs(*args, **env)
    assert decision["known"] == "yes", f"run.sh does not map `{' '.join(args)}`: {decision}"
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(decision["extras"].split(",")) <= extras, decision


@pytest.mark.parametrize("args,extras", [
    ((), {"llama", "otel"}),
    (("train", "--data", "x.jsonl"), {"llama", "train"}),
    (("data", "check", "x.jsonl"), {"llama", "train"}),
    (("eval", "perplexity", "x.jsonl"), {"llama", "eval", "hf"}),
    (("bench", "--url", "http://127.0.0.1:8000"), {"llama", "eval", "hf"}),
    (("models", "convert"), {"llama", "hf"}),
    (("batch", "run", "in.jsonl", "-o", "out.jsonl"), {"llama"}),
    (("serve", "--engine", "hf"), {"llama", "otel", "hf"}),
    (("serve", "--engine=vllm"), {"llama", "otel", "hf"}),
])
def test_each_command_gets_its_extras(args, extras):
    assert set(needs(*args)["extras"].split(",")) == extras


def test_every_cli_command_is_mapped(jarvis_cli):
    """Each top-level command of `jarvis --help` (plugins' included) has its line in run.sh."""
    listing = jarvis_cli("--help").stdout
    commands = re.findall(r"^  (\w[\w-]*)\s", listing.split("Commands:", 1)[1], flags=re.M)
    assert {"serve", "train", "eval", "batch"} <= set(commands), listing
    unmapped = [c for c in commands if needs(c)["known"] != "yes"]
    assert not unmapped, f"run.sh does not map {unmapped}"


def test_the_selected_engine_brings_its_needs():
    assert needs("serve", "--engine", "vllm")["vllm"] == "yes"
    assert needs(JARVIS_INFERENCE_ENGINE="vllm")["vllm"] == "yes"
    assert needs("doctor", "--engine", "vllm")["vllm"] == "yes"
    assert needs("serve")["vllm"] == "no"
    # a command that runs no engine does not install one
    assert needs("train", "--data", "x.jsonl", JARVIS_INFERENCE_ENGINE="vllm")["vllm"] == "no"
    assert needs("frobnicate")["known"] == "no"
