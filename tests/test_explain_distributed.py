"""explain under torchrun (CPU, gloo): sharded without padding, same results as one process, and
a run killed with SIGKILL resumes from its finished chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import explainkit
from explainkit.jobs.maps_store import STORE_NAME, MapsStore, load_results
from explainkit.models.card import CIFAR10_CLASSES
from tests.conftest import REPO

METHODS = "gradcam,gradcam++"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A CIFAR-10-shaped ImageFolder with 12 test images per class (120 in all)."""
    root = tmp_path_factory.mktemp("dist") / "data"
    rng = np.random.default_rng(3)
    for split, count in (("train", 1), ("test", 12)):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _command(processes: int, checkpoint: Path, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    return [
        *launcher,
        "-m",
        "explainkit",
        "explain",
        "--method",
        METHODS,
        "--checkpoint",
        str(checkpoint),
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        str(batch),
        "--device",
        "cpu",
        "--save-maps",
        "--samples",
        "1",
        "--misclassified",
        "2",
        *extra,
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(*args, **kwargs), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single(random_checkpoint, folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    _run(1, random_checkpoint, folder, out, 8)
    return out


def _same_results(a: Path, b: Path) -> None:
    maps_a, maps_b = explainkit.load_maps(a), explainkit.load_maps(b)
    assert list(maps_a) == list(maps_b) == METHODS.split(",")
    for name in maps_a:
        np.testing.assert_allclose(np.asarray(maps_a[name][:]), np.asarray(maps_b[name][:]), atol=2e-3)
    results_a, results_b = load_results(a), load_results(b)
    for key in ("predictions", "labels"):
        np.testing.assert_array_equal(results_a[key], results_b[key])
    np.testing.assert_allclose(results_a["probabilities"], results_b["probabilities"], atol=1e-5)


def test_two_processes_match_one_and_see_each_image_once(single, random_checkpoint, folder, tmp_path):
    _run(2, random_checkpoint, folder, tmp_path, 8)
    _same_results(single, tmp_path)
    results = load_results(tmp_path)
    assert results["labels"].tolist() == [i // 12 for i in range(120)]  # scan order, every row written once
    summary, reference = (json.loads((p / "summary.json").read_text()) for p in (tmp_path, single))
    assert summary["world_size"] == 2 and reference["world_size"] == 1
    assert summary["accuracy"] == reference["accuracy"] and summary["images"] == 120
    assert (tmp_path / "per_class.png").is_file() and (tmp_path / "misclassified.png").is_file()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so
    killing its process group alone leaves them running)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def _chunk_files(out: Path, chunks: list[int]) -> dict[Path, int]:
    root = out / STORE_NAME / "maps" / "gradcam"
    return {
        p: p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[:2] in {("c", str(c)) for c in chunks}
    }


def test_killed_run_resumes_from_finished_chunks(single, random_checkpoint, folder, tmp_path):
    process = subprocess.Popen(
        _command(2, random_checkpoint, folder, tmp_path, 2),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store_path = tmp_path / STORE_NAME
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            done = int(np.asarray(MapsStore.open(store_path).group["done"][:]).sum())
        except Exception:
            done = 0
        if done >= 6:
            break
        time.sleep(0.05)
    for pid in [process.pid, *_descendants(process.pid)]:  # SIGKILL the launcher and every worker
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    time.sleep(0.5)
    store = MapsStore.open(store_path)
    finished = [c for c in range(store.num_chunks) if c not in store.pending()]
    assert 6 <= len(finished) < store.num_chunks, "the run must be killed mid-way"
    assert not (tmp_path / "summary.json").exists()
    before = _chunk_files(tmp_path, finished)
    assert before

    resumed = _run(2, random_checkpoint, folder, tmp_path, 2, "--resume")
    assert f"{len(finished)} of {store.num_chunks} chunks already done" in resumed.stderr
    assert _chunk_files(tmp_path, finished) == before  # finished chunks were not recomputed
    _same_results(single, tmp_path)


def test_resume_refuses_a_store_made_with_other_settings(single, random_checkpoint, folder, tmp_path):
    _run(1, random_checkpoint, folder, tmp_path, 8)
    done = subprocess.run(
        _command(1, random_checkpoint, folder, tmp_path, 4, "--resume"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "cannot resume" in done.stderr and "chunk" in done.stderr
    assert "Traceback" not in done.stderr
