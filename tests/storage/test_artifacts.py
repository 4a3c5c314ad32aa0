"""Adapter directories: atomic writes, immutability, checksum verification, crash cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.artifacts import CHECKSUM, AdapterStore, ArtifactError


def _write_adapter(directory: Path) -> None:
    (directory / "adapter_config.json").write_text(json.dumps({"rank": 8}))
    (directory / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (directory / "extra").mkdir()
    (directory / "extra" / "router.json").write_text("{}")


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def test_write_is_atomic_and_checksummed(store: AdapterStore) -> None:
    info = store.write(1, _write_adapter)
    final = store.path(1)
    assert info.uri == str(final) and final.is_dir() and store.exists(1) and not store.exists(2)
    assert info.files == ["adapter_config.json", "adapter_model.safetensors", "extra/router.json"]
    assert len(info.sha256) == 64 and info.sha256 == AdapterStore.checksum(final)
    manifest = json.loads((final / CHECKSUM).read_text())
    assert manifest["sha256"] == info.sha256 and sorted(manifest["files"]) == info.files
    assert [p.name for p in store.root.iterdir()] == ["v1"]  # no temporary left behind
    store.verify(1, info.sha256)
    store.verify(1)  # against its own CHECKSUM file only
    assert store.versions() == [1]


def test_versions_are_immutable(store: AdapterStore) -> None:
    store.write(1, _write_adapter)
    with pytest.raises(ArtifactError, match="immutable"):
        store.write(1, _write_adapter)


def test_failed_writer_leaves_nothing(store: AdapterStore) -> None:
    def broken(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"12")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write(2, broken)
    assert list(store.root.iterdir()) == []
    with pytest.raises(ArtifactError, match="wrote no files"):
        store.write(2, lambda directory: None)


def test_verify_detects_a_flipped_byte(store: AdapterStore) -> None:
    info = store.write(3, _write_adapter)
    weights = store.path(3) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch in adapter_model.safetensors"):
        store.verify(3, info.sha256)


def test_verify_reports_missing_and_unexpected_files(store: AdapterStore) -> None:
    info = store.write(4, _write_adapter)
    with pytest.raises(ArtifactError, match="does not match the registry"):
        store.verify(4, "0" * 64)
    (store.path(4) / "stray.txt").write_text("?")
    with pytest.raises(ArtifactError, match="unexpected files: stray.txt"):
        store.verify(4, info.sha256)
    (store.path(4) / "stray.txt").unlink()
    (store.path(4) / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError, match="missing adapter_config.json"):
        store.verify(4, info.sha256)
    (store.path(4) / CHECKSUM).unlink()
    with pytest.raises(ArtifactError, match="CHECKSUM is missing"):
        store.verify(4, info.sha256)
    with pytest.raises(ArtifactError, match="v5 is missing"):
        store.verify(5, info.sha256)


def test_delete(store: AdapterStore) -> None:
    store.write(6, _write_adapter)
    assert store.delete(6) and not store.exists(6) and not store.delete(6)
    assert list(store.root.iterdir()) == []


def test_crash_leaves_only_a_temporary_that_cleanup_removes(store: AdapterStore, tmp_path: Path) -> None:
    # A real process killed mid-write (os._exit skips every cleanup handler).
    script = (
        "import os, sys\n"
        "from storage.artifacts import AdapterStore\n"
        "def writer(d):\n"
        "    (d / 'adapter_model.safetensors').write_bytes(b'x' * 10)\n"
        "    os._exit(3)\n"
        f"AdapterStore({str(store.root)!r}).write(7, writer)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], env=os.environ)
    assert result.returncode == 3
    leftovers = [p.name for p in store.root.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-v7-") and not store.exists(7)
    # A live write in this process is left alone; the dead process's is removed.
    live = store.root / f".tmp-v8-{os.getpid()}-abcdef12"
    live.mkdir()
    assert [p.name for p in store.cleanup_partial()] == leftovers
    assert [p.name for p in store.root.iterdir()] == [live.name]
    assert store.write(7, _write_adapter).files  # the version can now be written
