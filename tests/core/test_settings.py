"""Settings: every invalid value fails with the setting, the value and a fix."""

from __future__ import annotations

import pytest

from jarvis.plugin_manager import create_plugin_manager
from jarvis.registry import Registries, check_settings
from jarvis.settings import JarvisSettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("JARVIS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.fixture(scope="module")
def registries() -> Registries:
    return Registries.from_plugins(create_plugin_manager())


def test_defaults():
    s = load_settings()
    assert (s.inference_engine, s.host, s.port, s.chat_format) == ("llama_cpp", "127.0.0.1", 8000, "auto")
    assert s.model_name is None and s.api_keys == [] and s.plugins is None


def test_environment_and_dotenv(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("JARVIS_PORT=9001\nJARVIS_API_KEYS=a, b ,c\n")
    monkeypatch.setenv("JARVIS_MAX_MODEL_LEN", "2048")
    monkeypatch.setenv("JARVIS_CHAT_FORMATS", '{"m": "chatml"}')
    s = load_settings()
    assert s.port == 9001 and s.api_keys == ["a", "b", "c"]
    assert s.max_model_len == 2048 and s.chat_formats == {"m": "chatml"}


@pytest.mark.parametrize("name, value, fix", [
    ("JARVIS_PORT", "70000", "between 1 and 65535"),
    ("JARVIS_PORT", "eighty", "between 1 and 65535"),
    ("JARVIS_MAX_MODEL_LEN", "8", "between 16 and 1048576"),
    ("JARVIS_LOG_LEVEL", "loud", "one of critical, error, warning, info, debug"),
    ("JARVIS_CHAT_FORMATS", "not json", "JSON object"),
    ("JARVIS_HOST", "", "127.0.0.1"),
])
def test_invalid_values_name_the_setting_and_the_fix(monkeypatch, name, value, fix):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    [problem] = info.value.problems
    assert problem.setting == name
    assert fix in problem.fix
    assert name in str(info.value) and fix in str(info.value)


def test_every_field_documents_its_fix():
    for name, field in JarvisSettings.model_fields.items():
        assert field.description, name
        assert "fix" in (field.json_schema_extra or {}), name


@pytest.mark.parametrize("field, value, setting, suggestion", [
    ("inference_engine", "lama_cpp", "JARVIS_INFERENCE_ENGINE", "llama_cpp"),
    ("inference_engine", "llamacpp", "JARVIS_INFERENCE_ENGINE", "llama_cpp"),
    ("chat_format", "chatlm", "JARVIS_CHAT_FORMAT", "chatml"),
    ("chat_format", "gemma3", "JARVIS_CHAT_FORMAT", "gemma"),
])
def test_unknown_names_get_did_you_mean(registries, field, value, setting, suggestion):
    [problem] = check_settings(load_settings(**{field: value}), registries)
    assert problem.setting == setting and problem.value == value
    assert f"did you mean {suggestion!r}" in problem.problem
    assert problem.fix == f"{setting}={suggestion}".replace(f"{setting}=", f"set {setting}=")


def test_unknown_name_without_a_close_match_lists_the_known(registries):
    [problem] = check_settings(load_settings(chat_format="xyzzy"), registries)
    assert "chatml" in problem.fix and "gemma" in problem.fix


def test_per_model_chat_format_is_checked(registries):
    [problem] = check_settings(load_settings(chat_formats={"m": "lama3"}), registries)
    assert problem.setting == "JARVIS_CHAT_FORMATS['m']" and "llama3" in problem.fix


def test_serve_refuses_to_start_with_the_fix(jarvis_cli):
    done = jarvis_cli("serve", JARVIS_INFERENCE_ENGINE="lama_cpp", JARVIS_PORT="0")
    assert done.returncode == 2
    assert "JARVIS_INFERENCE_ENGINE" in done.stderr and "set JARVIS_INFERENCE_ENGINE=llama_cpp" in done.stderr
    assert "JARVIS_PORT" in done.stderr


def test_serve_rejects_a_missing_model_file(jarvis_cli, tmp_path):
    done = jarvis_cli("serve", JARVIS_MODEL_NAME=str(tmp_path / "nope.gguf"))
    assert done.returncode == 2
    assert "JARVIS_MODEL_NAME" in done.stderr and "no such file" in done.stderr


def test_doctor_reports_every_problem(jarvis_cli):
    done = jarvis_cli("doctor", JARVIS_CHAT_FORMAT="chatlm", JARVIS_MAX_MODEL_LEN="1")
    assert done.returncode == 1
    assert "JARVIS_CHAT_FORMAT" in done.stderr and "set JARVIS_CHAT_FORMAT=chatml" in done.stderr
    assert "JARVIS_MAX_MODEL_LEN" in done.stderr
    assert "JARVIS_INFERENCE_ENGINE" in done.stdout  # the resolved configuration is printed too


def test_doctor_passes_on_the_defaults(jarvis_cli):
    done = jarvis_cli("doctor")
    assert done.returncode == 0, done.stderr
    assert "no problems found" in done.stderr


def _jarvis_settings_classes():
    """Every pydantic-settings class the core, the engines and the plugins define (found by walking them)."""
    import importlib
    import pkgutil

    from pydantic_settings import BaseSettings

    import jarvis

    found = set()
    names = [i.name for i in pkgutil.walk_packages(jarvis.__path__, "jarvis.")]
    for pkg in ("jarvis.backends", "jarvis.plugins"):
        mod = importlib.import_module(pkg)
        names += [i.name for i in pkgutil.walk_packages(mod.__path__, pkg + ".")]
    for name in names:
        if name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional engine's module whose dependency this machine lacks
            continue
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseSettings) and value is not BaseSettings \
                    and value.__module__ == name:
                found.add(value)
    return found


def test_env_example_lists_every_setting():
    from pathlib import Path

    text = (Path(__file__).parents[2] / ".env.example").read_text()
    listed = {line.lstrip("# ").split("=", 1)[0] for line in text.splitlines() if "JARVIS_" in line.split("=", 1)[0]}
    classes = _jarvis_settings_classes()
    assert JarvisSettings in classes
    expected = {f"{cls.model_config.get('env_prefix', '')}{n}".upper()
                for cls in classes for n in cls.model_fields}
    assert len(classes) >= 3  # core, llama.cpp, transformers at least
    assert expected - listed == set(), "settings missing from .env.example"


def test_model_path_confined_to_the_model_root(tmp_path):
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    assert load_settings(model_root=root, model_name=str(root / "m")).model_name == str(root / "m")
    assert load_settings(model_root=root, model_name="m").model_name == "m"  # relative to the root
    for bad in (str(outside), "../elsewhere", str(root / "escape"), str(root / "m" / ".." / ".." / "elsewhere")):
        with pytest.raises(SettingsError) as info:
            load_settings(model_root=root, model_name=bad)
        (problem,) = info.value.problems
        assert problem.setting == "JARVIS_MODEL_NAME" and "outside JARVIS_MODEL_ROOT" in problem.problem


def test_api_keys_file_adds_keys_and_must_exist(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team a\nkey-one\n\nkey-two  # team b\nkey-one\n")
    settings = load_settings(api_keys="key-zero", api_keys_file=keys)
    assert settings.all_api_keys == ["key-zero", "key-one", "key-two"]
    with pytest.raises(SettingsError) as info:
        load_settings(api_keys_file=tmp_path / "missing")
    assert info.value.problems[0].setting == "JARVIS_API_KEYS_FILE"


def test_plugin_settings_problems_are_reported_like_the_core_ones(jarvis_cli):
    done = jarvis_cli("doctor", JARVIS_TELEMETRY_LOG_INTERVAL_S="soon", JARVIS_BATCH_CONCURRENCY="0")
    assert done.returncode == 1
    assert "JARVIS_TELEMETRY_LOG_INTERVAL_S" in done.stderr and "JARVIS_BATCH_CONCURRENCY" in done.stderr
    served = jarvis_cli("serve", JARVIS_BATCH_CONCURRENCY="0")
    assert served.returncode == 2 and "JARVIS_BATCH_CONCURRENCY" in served.stderr and "Traceback" not in served.stderr
