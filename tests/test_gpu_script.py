"""benchmarks/gpu.py --dry-run: every step of the GPU proof at toy size on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import explainkit
from tests.conftest import REPO


def test_gpu_script_dry_run(color_folder, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--dry-run", "--data-dir", str(color_folder), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"default-s0", "default-s1", "reference-s0"}
    assert results["benchmarks"]["returncode"] == 0 and "compile_probe" in results
    assert all(entry["maps"] > 0 for entry in results["parity_vs_cpu"].values())
    assert "## cpu-b4-fp32" in (out / "RESULTS-cuda.md").read_text()
    parts = sorted(out.glob("model.safetensors.part*"))
    assert len(parts) == results["model"]["parts"] >= 2 and all(p.stat().st_size <= 16 * 2**20 for p in parts)
    joined = tmp_path / "joined"
    subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--join", str(out), str(joined)], cwd=REPO, check=True, capture_output=True
    )
    model = explainkit.load_model(joined / "model.safetensors")
    assert model.card.extra["weights_dtype"] == "float16" and model.card.extra["recipe"]["name"] == "default"
