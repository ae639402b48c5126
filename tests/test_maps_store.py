"""The maps store under disk faults: a disk that fills mid-run is a one-line error and ``--resume``
finishes the run; a finished chunk damaged on disk is detected on ``--resume`` and recomputed."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from explainkit.cli import main
from explainkit.jobs.maps_store import STORE_NAME, MapsStore, load_maps


def _explain(checkpoint, folder, out, *extra: str) -> int:
    flags = ["--checkpoint", str(checkpoint), "--data-dir", str(folder), "--out", str(out), "--batch-size", "4"]
    return main(["explain", *flags, "--save-maps", "--samples", "1", "--misclassified", "2", *extra])


@pytest.fixture(scope="module")
def clean_maps(random_checkpoint, tiny_folder, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("clean")
    assert _explain(random_checkpoint, tiny_folder, out) == 0
    return np.asarray(load_maps(out)["gradcam"][:])


def _fill_disk_after(monkeypatch, writes: int) -> None:
    """Every write through zarr's local store after the first ``writes`` fails as a full disk would."""
    from zarr.storage import LocalStore

    original = LocalStore.set
    count = {"writes": 0}

    async def set_or_fail(self, key, value):
        count["writes"] += 1
        if count["writes"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_or_fail)


def test_a_full_disk_is_one_line_and_resume_finishes(random_checkpoint, tiny_folder, tmp_path, monkeypatch, capsys, clean_maps):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _fill_disk_after(patch, writes=40)  # the store's metadata and a few chunks, then the disk is full
        assert _explain(random_checkpoint, tiny_folder, out) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "failed (No space left on device); free space or fix the disk, then run again with --resume" in error
    assert "Traceback" not in error
    store = MapsStore.open(out / STORE_NAME)
    assert 0 < len(store.pending()) < store.num_chunks  # some chunks finished, the rest left pending
    assert _explain(random_checkpoint, tiny_folder, out, "--resume") == 0
    assert np.array_equal(np.asarray(load_maps(out)["gradcam"][:]), clean_maps)


def _damage(store: MapsStore, chunk: int) -> None:
    """Overwrite the file of one chunk of the gradcam maps with garbage of the same length."""
    target = store.path / "maps" / "gradcam" / "c" / str(chunk) / "0" / "0"  # zarr v3: c/<row chunk>/<h>/<w>
    target.write_bytes(np.random.default_rng(0).bytes(target.stat().st_size))


def test_a_damaged_chunk_is_detected_on_resume_and_recomputed(random_checkpoint, tiny_folder, tmp_path, capsys, clean_maps):
    out = tmp_path / "out"
    assert _explain(random_checkpoint, tiny_folder, out) == 0
    store = MapsStore.open(out / STORE_NAME)
    assert store.damaged() == []
    _damage(store, 2)
    assert store.damaged() == [2]
    capsys.readouterr()
    assert _explain(random_checkpoint, tiny_folder, out, "--resume") == 0
    assert "1 finished chunks of" in capsys.readouterr().err
    assert MapsStore.open(out / STORE_NAME).damaged() == []
    assert np.array_equal(np.asarray(load_maps(out)["gradcam"][:]), clean_maps)


def test_a_changed_value_fails_its_checksum(tmp_path):
    store = MapsStore.create(tmp_path / STORE_NAME, rows=4, chunk=2, methods=["m"], map_size=(2, 2), fingerprint={})
    for chunk in range(2):
        store.write_chunk(chunk, torch.zeros(2), torch.zeros(2), torch.ones(2), {"m": torch.rand(2, 2, 2)})
    store.group["probabilities"][3] = 0.5  # a silent bit flip: the file still decodes
    assert store.damaged() == [1]
    store.recompute([1])
    assert store.pending() == [1]
