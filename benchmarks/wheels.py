"""The peers' wheels travel with the GPU run: downloaded here, installed there without an index.

    python benchmarks/wheels.py download            # here (network): into benchmarks/.wheels/ (git-ignored)
    python benchmarks/wheels.py install             # there (no network): only what is missing, into a folder

The GPU machine has torch, torchvision, numpy, matplotlib, scikit-learn, opencv-python-headless,
tqdm, packaging and pluggy, and no package index. What it lacks, each pure Python, pinned to the
versions the dev extra tests against (``--no-deps``: nothing beyond these is fetched or installed):

========================  =========  ================================================================
package                   version    for
========================  =========  ================================================================
grad-cam (+ ttach)        1.5.7      pytorch-grad-cam rows and the ``pgc-*`` references (built here
                                     from its sdist: PyPI has no wheel of it)
captum                    0.9.0      Captum ``LayerGradCam`` rows and ``captum-gradcam``
torchcam                  0.5.0      torch-cam references (LeGrad, Finer-CAM)
torch-lr-finder           0.2.2      ``reference``'s LR range test
airbench                  0.1.8      the airbench94 anchor (built here from its sdist)
========================  =========  ================================================================

About 0.6 MB together.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

WHEELS = Path(__file__).resolve().parent / ".wheels"

#: (distribution, version, import name, whether PyPI has a wheel: else built here from the sdist)
PACKAGES = (
    ("grad-cam", "1.5.7", "pytorch_grad_cam", False),
    ("ttach", "0.0.3", "ttach", True),
    ("captum", "0.9.0", "captum", True),
    ("torchcam", "0.5.0", "torchcam", True),
    ("torch-lr-finder", "0.2.2", "torch_lr_finder", True),
    ("airbench", "0.1.8", "airbench", False),
)
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]


def download(dest: Path = WHEELS) -> list[Path]:
    """Every package's wheel into ``dest`` (network needed): ``pip download`` where PyPI has a
    wheel, ``pip wheel`` from the sdist where it has none."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for name, version, _, has_wheel in PACKAGES:
        spec = f"{name}=={version}"
        if has_wheel:
            command = pip + ["download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(dest), spec]
        else:
            command = pip + ["wheel", "--no-deps", "-w", str(dest), spec]
        subprocess.run(command, check=True)
    return sorted(dest.glob("*.whl"))


def missing() -> list[tuple[str, str, str, bool]]:
    """The packages this Python cannot import."""
    return [p for p in PACKAGES if importlib.util.find_spec(p[2]) is None]


def install(source: Path = WHEELS, target: Path | None = None) -> dict:
    """Install what is missing from the wheels in ``source`` with ``--no-index --find-links``
    (``--no-deps``), into ``target`` (put first on ``sys.path`` and ``PYTHONPATH`` for
    subprocesses) or the running environment. Returns ``{"installed": [...], "present": [...],
    "unavailable": [...]}``: a package without a wheel in ``source`` is reported, not fatal."""
    import os

    absent = missing()
    present = [f"{name}=={version}" for name, version, *_ in PACKAGES if (name, version, *_) not in absent]
    wheels = {path.name.split("-")[0].replace("_", "-").lower() for path in source.glob("*.whl")} if source.is_dir() else set()
    wanted = [p for p in absent if p[0].replace("_", "-") in wheels]
    report = {
        "installed": [f"{n}=={v}" for n, v, *_ in wanted],
        "present": present,
        "unavailable": [f"{n}=={v}" for n, v, *_ in absent if (n, v, *_) not in wanted],
    }
    if not wanted:
        return report
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--find-links", str(source)]
    if target is not None:
        command += ["--target", str(target)]
    subprocess.run(command + [f"{n}=={v}" for n, v, *_ in wanted], check=True)
    if target is not None:
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("download", "install"))
    parser.add_argument("--dir", type=Path, default=WHEELS, help=f"the wheels folder (default {WHEELS})")
    parser.add_argument("--target", type=Path, help="install into this folder instead of the environment")
    args = parser.parse_args(argv)
    if args.action == "download":
        paths = download(args.dir)
        for path in paths:
            print(f"{path.stat().st_size / 2**10:8.1f} KiB  {path.name}")
        print(f"{sum(p.stat().st_size for p in paths) / 2**20:8.2f} MiB  in all")
    else:
        print(install(args.dir, args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
