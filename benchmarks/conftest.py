"""Benchmark protocol: every case in one process, same model, batch, device and thread count;
pytest-benchmark warms up and reports the median of rounds; CUDA timings are synchronised.

``pytest --benchmark-only`` runs the suite at full size (CPU batch 64; CUDA batch 256 and 1024).
An ordinary ``pytest`` run executes every case once at batch 4 with timing disabled, so the
suite stays tested but fast. ``--write-results`` writes ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from explainkit.models.store import resnet18_cifar

RESULTS = Path(__file__).with_name("RESULTS.md")


def pytest_addoption(parser):
    group = parser.getgroup("explainkit benchmarks")
    group.addoption("--write-results", action="store_true", help=f"write {RESULTS.name} after a --benchmark-only run")
    group.addoption(
        "--e2e-images", type=int, default=None, help="images explained end to end (default 2000 CPU, whole split CUDA)"
    )
    group.addoption("--results-path", default=str(RESULTS), help=f"where --write-results writes (default {RESULTS})")
    group.addoption(
        "--bench-size",
        choices=("full", "toy"),
        default="full",
        help="toy: time every case at batch 4 (the GPU script's --dry-run)",
    )


def pytest_configure(config):
    if not config.getoption("benchmark_only", False):
        config.option.benchmark_disable = True  # ordinary test run: each case once, untimed


def full_size(config) -> bool:
    return bool(config.getoption("benchmark_only", False)) and config.getoption("bench_size") == "full"


def timed(config) -> bool:
    return bool(config.getoption("benchmark_only", False))


def cuda_configs():
    """(batch, dtype, channels_last) per CUDA case: fp32 and bf16 autocast, batch 256 and 1024."""
    return [(b, d) for b in (256, 1024) for d in (None, torch.bfloat16)]


@pytest.fixture(scope="session")
def bench_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet18_cifar(10).eval()


def devices():
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    return found


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    bench_session = getattr(config, "_benchmarksession", None)
    if not config.getoption("write_results") or bench_session is None or not timed(config):
        return
    from benchmarks.report import write_results

    write_results(bench_session.benchmarks, Path(config.getoption("results_path")))
