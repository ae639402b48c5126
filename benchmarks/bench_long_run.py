"""A long job's memory: ``explain --save-maps`` over the test split, the process's RSS sampled
through the run against the images written to ``maps.zarr`` so far.

Target: RSS at 10,000 images within 100 MB of its value at 1,000 (memory flat in the dataset
size: one batch held at a time, maps streamed to disk). ``pytest --benchmark-only`` runs the whole
10,000-image JPEG test split from ``../shared``; an ordinary ``pytest`` run explains 400 images
and checks the same rule between 100 and 400. Skipped without ``../shared``.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks.conftest import full_size

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
CHECKPOINT = SHARED / "models" / "resnet18-cifar10.pt"
MAX_GROWTH_MB = 100
RECORDED: dict[str, float] = {}


def _data(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("cifar-jpeg")
    with tarfile.open(ARCHIVE) as archive:  # the test split only: a sixth of the files
        members = [m for m in archive.getmembers() if "/train/" not in m.name]
        archive.extractall(target, members=members, filter="data")
    return target / "cifar10-jpeg"


def _images_done(store: Path, batch: int) -> int:
    """Images written so far: finished chunks (zarr writes a ``done`` chunk file once set) x batch."""
    done = store / "done" / "c"
    return len(list(done.iterdir())) * batch if done.is_dir() else 0


def run_and_sample(data: Path, out: Path, images: int, batch: int) -> list[tuple[int, float]]:
    """Run ``explain --save-maps`` on ``images`` test images; ``(images written, RSS MB)`` samples."""
    import psutil

    command = [sys.executable, "-m", "explainkit", "explain", "--checkpoint", str(CHECKPOINT), "--data-dir", str(data)]
    command += ["--out", str(out), "--save-maps", "--limit", str(images), "--batch-size", str(batch)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    samples: list[tuple[int, float]] = []
    while process.poll() is None:
        try:
            samples.append((_images_done(out / "maps.zarr", batch), watched.memory_info().rss / 2**20))
        except (psutil.NoSuchProcess, FileNotFoundError):
            break
        time.sleep(0.25)
    _, errors = process.communicate()
    assert process.returncode == 0, errors[-2000:]
    return samples


def rss_at(samples: list[tuple[int, float]], images: int) -> float:
    """The RSS of the first sample with at least ``images`` written (the scan's, before the figures)."""
    return next((rss for done, rss in samples if done >= images), samples[-1][1])


@pytest.mark.skipif(
    not (ARCHIVE.is_file() and CHECKPOINT.is_file()), reason="needs ../shared (the JPEG CIFAR-10 and the fixture model)"
)
def test_rss_stays_flat_over_a_long_explain(benchmark, request, tmp_path_factory, tmp_path):
    full = full_size(request.config)
    images, early, batch = (10_000, 1_000, 128) if full else (400, 100, 50)
    data = _data(tmp_path_factory)
    samples: list[tuple[int, float]] = []

    def run() -> None:
        samples[:] = run_and_sample(data, tmp_path / f"out-{len(samples)}", images, batch)

    benchmark.pedantic(run, rounds=1, iterations=1)
    at_early, at_end = rss_at(samples, early), rss_at(samples, images)
    benchmark.extra_info.update(images=images, rss_mb_early=round(at_early, 1), rss_mb_end=round(at_end, 1), early=early)
    RECORDED.update(images=images, early=early, at_early=at_early, at_end=at_end, peak=max(r for _, r in samples))
    print(f"\nRSS at {early} images {at_early:.0f} MB, at {images} {at_end:.0f} MB, peak {RECORDED['peak']:.0f} MB")
    assert at_end - at_early <= MAX_GROWTH_MB, f"RSS grew {at_end - at_early:.0f} MB from {early} to {images} images"
