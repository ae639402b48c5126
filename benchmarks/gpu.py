"""The GPU proof in one command: train, benchmark, and package the model, into one output folder.

    python benchmarks/gpu.py --data-archive PATH/cifar10-jpeg.tar.gz --out OUT      # on one GPU, ~5 min
    python benchmarks/gpu.py --dry-run --data-dir DIR --out OUT                      # every step, toy size, CPU

Steps (each timed, all numbers into ``OUT/results.json``):

1. decode the JPEG CIFAR-10 once into uint8 tensors (the device-resident data path);
2. train ``default`` with seeds 0 and 1 and ``reference`` with seed 0, 20 epochs each, eager;
3. a ``torch.compile`` probe: ``default`` for a few epochs compiled, to compare the steady epoch
   time with the eager run's (skipped when the time budget is spent);
4. the CUDA rows of the benchmark suite (``pytest benchmarks --benchmark-only -k cuda``), written
   to ``OUT/RESULTS-cuda.md`` and ``OUT/benchmarks.json``;
5. the seed-0 ``default`` model as fp16 safetensors split in two parts (the device tool returns
   files of at most 16 MiB; ``python benchmarks/gpu.py --join OUT DEST`` joins them) plus its card,
   and the runs' reports (history, curves, confusion matrix, ...) in ``OUT/reports.tar.gz``.

Needs torch, torchvision, matplotlib, pluggy, safetensors, tqdm, pytest-benchmark and
torch-lr-finder (for ``reference``'s LR range test); not albumentations, captum or grad-cam.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from explainkit.models.store import save_model  # noqa: E402
from explainkit.training.recipes import resolve_recipe  # noqa: E402
from explainkit.training.trainer import TrainConfig, load_device_splits, train  # noqa: E402

PART_SIZE = 12 * 2**20
RUNS = (("default", 0), ("default", 1), ("reference", 0))


def log(message: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def data_root(args, scratch: Path) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    log(f"extracting {args.data_archive}")
    with tarfile.open(args.data_archive) as archive:
        archive.extractall(scratch, filter="data")
    return scratch / "cifar10-jpeg"


def train_run(args, recipe_name: str, seed: int, splits, device, scratch: Path, results: dict) -> Path:
    overrides = dict(epochs=1, batch_size=32, train_limit=128, test_limit=64) if args.dry_run else {}
    recipe = resolve_recipe(recipe_name, **overrides)
    key = f"{recipe_name}-s{seed}"
    out = scratch / key
    started = time.perf_counter()
    result = train(
        recipe,
        TrainConfig(
            out,
            device=device,
            seed=seed,
            data_path="device",
            splits=splits,
            lr_find_iters=20 if args.dry_run else 100,
            progress=False,
        ),
    )
    wall = time.perf_counter() - started
    card = json.loads((out / "model.json").read_text())
    results["runs"][key] = {
        "recipe": recipe_name,
        "seed": seed,
        "epochs": recipe.epochs,
        "test_accuracy": result.test_accuracy,
        "train_seconds": round(result.train_seconds, 2),
        "wall_seconds_with_lr_find_and_reports": round(wall, 2),
        "max_lr": card["recipe"]["lr"],
        "epoch_seconds": [round(r["seconds"], 3) for r in result.history],
        "test_accuracy_per_epoch": [round(r["test_accuracy"], 4) for r in result.history],
    }
    log(f"{key}: {100 * result.test_accuracy:.2f}% in {result.train_seconds:.1f} s of epochs ({wall:.1f} s wall)")
    write_results(args.out, results)
    return out


def parity(model_path: Path, splits, device, results: dict) -> None:
    """Our CAMs on the GPU (fp32 and bf16 autocast) against the same CAMs on the CPU in fp32."""
    import explainkit
    from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus
    from explainkit.training.device_data import normalize

    model = explainkit.load_model(model_path)
    images = normalize(splits[1].images[:: max(1, len(splits[1]) // 256)][:256], model.card.mean, model.card.std)
    out = {}
    for cls in (GradCAM, GradCAMPlusPlus):
        for targets in (None, "all"):
            reference = cls(model.cpu(), "layer4")(images, targets=targets).flatten(0, -3)
            for dtype in (None, torch.bfloat16):
                maps = (
                    cls(model.to(device), "layer4", autocast=dtype)(images.to(device), targets=targets)
                    .float()
                    .cpu()
                    .flatten(0, -3)
                )
                a = reference.flatten(1) - reference.flatten(1).mean(1, keepdim=True)
                b = maps.flatten(1) - maps.flatten(1).mean(1, keepdim=True)
                corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
                flat = (a.norm(dim=1) < 1e-6) & (b.norm(dim=1) < 1e-6)  # both constant: agree
                corr = torch.where(flat, torch.ones_like(corr), corr)
                out[f"{cls.__name__}-{targets or 'predicted'}-{'bf16' if dtype else 'fp32'}"] = {
                    "min_corr": round(float(corr.min()), 5),
                    "mean_corr": round(float(corr.mean()), 5),
                    "share_above_0.99": round(float((corr > 0.99).float().mean()), 5),
                    "maps": int(corr.numel()),
                    "max_abs_diff": round(float((reference - maps).abs().max()), 5),
                }
    results["parity_vs_cpu"] = out
    log(f"parity vs CPU fp32: {out}")


def compile_probe(args, splits, device, scratch: Path, results: dict) -> None:
    epochs = 1 if args.dry_run else 4
    overrides = dict(epochs=epochs)
    if args.dry_run:
        overrides.update(batch_size=32, train_limit=128, test_limit=64)
    started = time.perf_counter()
    result = train(
        resolve_recipe("default", **overrides),
        TrainConfig(
            scratch / "compiled",
            device=device,
            seed=0,
            data_path="device",
            splits=splits,
            compile="eager" if args.dry_run else True,
            reports=False,
        ),
    )
    seconds = [r["seconds"] for r in result.history]
    eager = results["runs"]["default-s0"]["epoch_seconds"]
    steady_compiled = min(seconds[1:] or seconds)
    steady_eager = min(eager[1:] or eager)
    results["compile_probe"] = {
        "epochs": epochs,
        "epoch_seconds": [round(s, 3) for s in seconds],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "steady_epoch_seconds_compiled": round(steady_compiled, 3),
        "steady_epoch_seconds_eager": round(steady_eager, 3),
        "speedup": round(steady_eager / steady_compiled, 3),
        "first_epoch_overhead_seconds": round(seconds[0] - steady_compiled, 2),
    }
    log(f"compile probe: {results['compile_probe']}")


def benchmarks(args, root: Path, results: dict) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        "--write-results",
        "--results-path",
        str(args.out / "RESULTS-cuda.md"),
        f"--benchmark-json={args.scratch / 'benchmarks.json'}",
    ]
    command += ["--bench-size", "toy"] if args.dry_run else ["-k", "cuda"]
    env = dict(os.environ, EXPLAINKIT_TEST_DATA_DIR=str(root))
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True)
    print(completed.stdout[-6000:], completed.stderr[-3000:], sep="\n", flush=True)
    results["benchmarks"] = {"returncode": completed.returncode, "seconds": round(time.perf_counter() - started, 1)}
    if completed.returncode != 0:
        raise SystemExit(f"benchmarks failed with exit status {completed.returncode}")


def package_model(args, source: Path, results: dict) -> None:
    """The seed-0 default model as fp16 safetensors in parts, with its card."""
    import explainkit

    model = explainkit.load_model(source).half()
    card = model.card
    card.extra.update(weights_dtype="float16", gpu_script=results["environment"])
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_model(model, card, Path(tmp) / "model.safetensors")
        blob = weights.read_bytes()
        parts = [blob[i : i + PART_SIZE] for i in range(0, len(blob), PART_SIZE)]
        for index, part in enumerate(parts):
            (args.out / f"model.safetensors.part{index}").write_bytes(part)
        (args.out / "model.json").write_text(weights.with_suffix(".json").read_text())
    results["model"] = {"bytes": len(blob), "parts": len(parts), "from": "default-s0"}


def package_reports(args, outs: dict[str, Path]) -> None:
    """Every finished run's reports (history, card, curves, confusion matrix, ...) in one archive."""
    with tarfile.open(args.out / "reports.tar.gz.tmp", "w:gz") as archive:
        if (args.scratch / "benchmarks.json").exists():
            archive.add(args.scratch / "benchmarks.json", arcname="benchmarks.json")
        for key, out in outs.items():
            for path in sorted(out.iterdir()):
                if path.suffix in (".png", ".csv", ".json"):
                    archive.add(path, arcname=f"{key}/{path.name}")
    (args.out / "reports.tar.gz.tmp").replace(args.out / "reports.tar.gz")


def join_parts(folder: Path, dest: Path) -> Path:
    """Reassemble ``model.safetensors`` (+ ``model.json``) from the parts in ``folder`` into ``dest``."""
    parts = sorted(folder.glob("model.safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"no model.safetensors.part* in {folder}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.safetensors").write_bytes(b"".join(p.read_bytes() for p in parts))
    (dest / "model.json").write_text((folder / "model.json").read_text())
    return dest / "model.safetensors"


def write_results(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out / "results.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", help="extracted ImageFolder CIFAR-10 (train/ and test/)")
    source.add_argument("--data-archive", help="cifar10-jpeg.tar.gz to extract first")
    parser.add_argument("--out", type=Path, help="output folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds after which the optional compile probe is skipped")
    parser.add_argument("--join", nargs=2, metavar=("PARTS_DIR", "DEST_DIR"), help="join a run's model parts and exit")
    args = parser.parse_args(argv)
    if args.join:
        print(join_parts(Path(args.join[0]), Path(args.join[1])))
        return 0
    if not args.out or not (args.data_dir or args.data_archive):
        parser.error("--out and one of --data-dir/--data-archive are required")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run to exercise the steps on the CPU")
    results: dict = {"environment": environment(), "dry_run": args.dry_run, "runs": {}}
    log(f"environment: {results['environment']}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = args.scratch = Path(tmp)
        root = data_root(args, scratch)
        t0 = time.perf_counter()
        splits = load_device_splits(root, download=False)
        results["decode_seconds"] = round(time.perf_counter() - t0, 2)
        log(f"decoded {len(splits[0])} train + {len(splits[1])} test images in {results['decode_seconds']} s")
        # The order puts what matters most first: a timeout keeps everything written before it.
        outs = {"default-s0": train_run(args, "default", 0, splits, device, scratch, results)}
        package_model(args, outs["default-s0"] / "model.pt", results)
        package_reports(args, outs)
        parity(outs["default-s0"] / "model.pt", splits, device, results)
        write_results(args.out, results)
        benchmarks(args, root, results)
        write_results(args.out, results)
        for recipe_name, seed in RUNS[1:]:
            outs[f"{recipe_name}-s{seed}"] = train_run(args, recipe_name, seed, splits, device, scratch, results)
            package_reports(args, outs)
        runs = results["runs"]
        default_runs = [runs[k]["test_accuracy"] for k in ("default-s0", "default-s1")]
        results["summary"] = {
            "default_mean_accuracy": sum(default_runs) / 2,
            "reference_accuracy": runs["reference-s0"]["test_accuracy"],
            "default_s0_train_seconds": runs["default-s0"]["train_seconds"],
        }
        write_results(args.out, results)
        if time.perf_counter() - started < args.budget:
            compile_probe(args, splits, device, scratch, results)
        else:
            results["compile_probe"] = "skipped: time budget spent"
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, results)
    log(f"done in {results['total_seconds']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
