"""The GPU proof in one command: train, anchor, benchmark, and package the model, into one output folder.

    python benchmarks/wheels.py download                                             # here, once (network)
    python benchmarks/gpu.py --data-archive PATH/cifar10-jpeg.tar.gz --out OUT      # on one GPU, ~8 min
    python benchmarks/gpu.py --dry-run --data-dir DIR --out OUT                      # every step, toy size, CPU

Steps (each timed, all numbers into ``OUT/results.json``, the GPU named in its ``environment``):

0. install what the machine lacks (pytorch-grad-cam, ttach, Captum, torch-cam, torch-lr-finder,
   airbench) from the wheels in ``--wheels`` (``benchmarks/.wheels``, filled here by
   ``benchmarks/wheels.py download``) with ``pip install --no-index --no-deps --find-links``;
1. decode the JPEG CIFAR-10 once into uint8 tensors (the device-resident data path);
2. train ``default`` seed 0, eager; package it (step 8) at once;
3. the anchor on the same data: airbench94 (``benchmarks/airbench_anchor.py``), seeds 0 and 1,
   on the tensors of step 1: accuracy with airbench's published test-time augmentation, its
   training time, and the JPEG cost (94.01% minus its mean);
4. the CAM rows (``benchmarks/gpu_cams.py``) with the step-2 model: Grad-CAM at layer4 eager vs
   captured in a CUDA graph (``explainkit.explainers.graphs.CapturedCAM``) vs a plain forward,
   single target and all ten classes, batch 1,024, fp32 and bf16, with captured-vs-eager parity;
   all classes for the 10,000 test images from resident tensors; ours vs pytorch-grad-cam and
   Captum; Score-CAM ours vs pytorch-grad-cam; the newer native methods vs their ``pgc-``
   references (those registered);
5. our CAMs on the GPU (fp32 and bf16) against the same CAMs on the CPU;
6. the other runs (``--run``; default: ``default`` seed 1, ``reference`` with ``lr=auto`` and
   with the course's ``lr=1.91e-3``), and the summary against the issue's targets;
7. the CUDA rows of the benchmark suite (``pytest benchmarks --benchmark-only -k cuda``), peers
   included, written to ``OUT/RESULTS-cuda.md`` and ``OUT/benchmarks.json``;
8. the seed-0 ``default`` model as fp16 safetensors split in two parts (the device tool returns
   files of at most 16 MiB; ``python benchmarks/gpu.py --join OUT DEST`` joins them) plus its card,
   and the runs' reports (history, curves, confusion matrix, ...) in ``OUT/reports.tar.gz``;
9. a ``torch.compile`` probe of training (skipped when ``--budget`` is spent).

``--skip anchor|cams|parity|benchmarks|probe`` (repeatable) leaves steps out when the device
tool's 10 minutes a command are tight: on an H200 the four ResNet runs take about 1 min each, the
anchor and the CAM rows under 1 min together, the benchmark suite with its peers 2-3 min.

A run is ``KEY:RECIPE:SEED[:FIELD=VALUE,...]``: any :class:`~explainkit.training.recipes.Recipe`
field (``lr``, ``epochs``, ``ema_decay``, ``tta_flip``, ``label_smoothing``, ``cutout``,
``no_decay_bn_bias``, ``bn_bias_lr_mult``, ...) passes through, e.g.
``--run default-ema:default:0:ema_decay=0.999,tta_flip=True``.

What the device tool carries (``carry``; tracked files, untracked-unignored files and carried
paths travel together, 64 MiB at most): ``benchmarks/.wheels`` (0.6 MiB, the six wheels above;
git-ignored) and ``.gpu`` (a folder named in ``.git/info/exclude`` holding, for the run only, a
copy of ``../shared/data/cifar10-jpeg.tar.gz``: 18.5 MiB), beside the tracked tree (about 25 MiB,
the committed model folder included): about 45 MiB in all. The command then starts
``python benchmarks/gpu.py --data-archive .gpu/cifar10-jpeg.tar.gz --out $OUT``. The machine has
torch, torchvision, matplotlib, pluggy, safetensors, tqdm, pytest-benchmark, scikit-learn and
OpenCV; not albumentations (the device data path needs none).
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
FIRST_RUN = "default-s0:default:0"  # trained first: the packaged model and the CAM rows' model
RUNS = (
    "default-s1:default:1",
    "reference-s0:reference:0",  # lr=auto: our LR range test, as the course ran it
    "reference-lr1.91e-3-s0:reference:0:lr=1.91e-3",  # the course's LR range test's pick
)
SKIPPABLE = ("anchor", "cams", "parity", "benchmarks", "probe")
DRY_RUN_CASES = "test_forward_floor or test_ours_all_classes or test_pytorch_grad_cam_single_target or test_captum_single_target"
COURSE = {"reference_test_accuracy": 0.9126, "reference_train_accuracy": 0.9893}


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


def parse_run(text: str) -> tuple[str, str, int, dict]:
    """``KEY:RECIPE:SEED[:FIELD=VALUE,...]`` as ``(key, recipe, seed, overrides)``."""
    import ast

    parts = text.split(":", 3)
    if len(parts) < 3 or not parts[2].isdigit():
        raise SystemExit(f"--run {text!r}: expected KEY:RECIPE:SEED[:FIELD=VALUE,...]")
    overrides: dict = {}
    for item in filter(None, (parts[3] if len(parts) > 3 else "").split(",")):
        field, _, value = item.partition("=")
        try:
            overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[field] = value
    return parts[0], parts[1], int(parts[2]), overrides


def train_run(args, spec: str, splits, device, scratch: Path, results: dict) -> Path:
    key, recipe_name, seed, overrides = parse_run(spec)
    toy = dict(epochs=1, batch_size=32, train_limit=128, test_limit=64) if args.dry_run else {}
    recipe = resolve_recipe(recipe_name, **{**overrides, **toy})
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
            lr_find_iters=20 if args.dry_run else None,  # None: the recipe's (200 for reference, as the course)
            progress=False,
        ),
    )
    wall = time.perf_counter() - started
    card = json.loads((out / "model.json").read_text())
    results["runs"][key] = {
        "recipe": recipe_name,
        "seed": seed,
        "overrides": overrides,
        "epochs": recipe.epochs,
        "test_accuracy": result.test_accuracy,
        "train_accuracy": result.history[-1]["train_accuracy"],
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
    if args.dry_run:  # the runner and the report at toy size; CI's plain pytest runs every case once already
        command[3] = "benchmarks/bench_explainers.py"
        command += ["--bench-size", "toy", "-k", DRY_RUN_CASES]
    else:
        command += ["-k", "cuda"]
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


def install_peers(args, scratch: Path, results: dict) -> None:
    """Step 0: what this Python lacks, from the carried wheels, into a scratch folder put on the path."""
    from benchmarks.wheels import install

    started = time.perf_counter()
    try:
        report = install(args.wheels, scratch / "site")
    except subprocess.CalledProcessError as exc:
        report = {"error": f"pip install failed with exit status {exc.returncode}"}
    report["seconds"] = round(time.perf_counter() - started, 1)
    results["peers"] = report
    log(f"peers: {report}")


def anchor(args, splits, device, scratch: Path, results: dict) -> None:
    """Step 3: airbench94 on our decoded tensors, seeds 0 and 1."""
    import importlib.util

    if importlib.util.find_spec("airbench") is None:
        results["airbench94"] = {"skipped": f"airbench is not installed (no wheel in {args.wheels})"}
        return
    from benchmarks.airbench_anchor import run_anchor

    started = time.perf_counter()
    results["airbench94"] = run_anchor(splits, device, scratch, dry_run=args.dry_run)
    results["airbench94"]["step_seconds"] = round(time.perf_counter() - started, 1)
    summary = {k: v for k, v in results["airbench94"].items() if k != "runs"}
    log(f"airbench94: {summary}")


def cam_rows(model_path: Path, splits, device, results: dict, dry_run: bool) -> None:
    """Step 4: the CAM rows of ``benchmarks/gpu_cams.py`` with the trained model."""
    import explainkit
    from benchmarks.gpu_cams import run_cam_rows
    from explainkit.training.device_data import normalize

    model = explainkit.load_model(model_path)
    test = normalize(splits[1].images.to(device), model.card.mean, model.card.std)
    started = time.perf_counter()
    results["cams"] = run_cam_rows(model, test, device, dry_run)
    results["cams"]["step_seconds"] = round(time.perf_counter() - started, 1)
    log(f"CAM rows: {json.dumps(results['cams'])[:3000]}")


def summarise(results: dict) -> dict:
    """The issue's targets, each with what was measured and whether it was met."""
    runs = results["runs"]
    anchor = results.get("airbench94", {})
    mean_anchor = anchor.get("mean_test_accuracy")
    defaults = [runs[k]["test_accuracy"] for k in ("default-s0", "default-s1") if k in runs]
    out: dict = {
        "default_mean_accuracy": sum(defaults) / len(defaults) if defaults else None,
        "default_s0_train_seconds": runs.get("default-s0", {}).get("train_seconds"),
        "airbench94_mean_accuracy": mean_anchor,
        "jpeg_cost": anchor.get("jpeg_cost"),
        "course": COURSE,
    }
    for key, run in runs.items():
        if run["recipe"] == "reference":
            out[key] = {k: run[k] for k in ("test_accuracy", "train_accuracy", "max_lr")}
    if mean_anchor is not None:
        wanted = COURSE["reference_test_accuracy"] - anchor["jpeg_cost"] - 0.01
        best = max((v["test_accuracy"] for k, v in runs.items() if v["recipe"] == "reference"), default=None)
        out["reference_target"] = {"wanted": wanted, "best": best, "met": best is not None and best >= wanted}
        seconds = [runs[k]["train_seconds"] for k in ("default-s0", "default-s1") if k in runs]
        met = bool(defaults) and out["default_mean_accuracy"] >= mean_anchor and max(seconds) <= 60
        out["default_target"] = {"wanted": f">= {mean_anchor:.4f} in <= 60 s", "met": met}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.join:
        print(join_parts(Path(args.join[0]), Path(args.join[1])))
        return 0
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run to exercise the steps on the CPU")
    results: dict = {"environment": environment(), "dry_run": args.dry_run, "runs": {}}
    log(f"environment: {results['environment']}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = args.scratch = Path(tmp)
        install_peers(args, scratch, results)
        splits = decode(args, scratch, results)
        # The order puts what matters most first: a timeout keeps everything written before it.
        outs = {"default-s0": train_run(args, FIRST_RUN, splits, device, scratch, results)}
        package_model(args, outs["default-s0"] / "model.pt", results)
        package_reports(args, outs)
        for name, step in (
            ("anchor", lambda: anchor(args, splits, device, scratch, results)),
            ("cams", lambda: cam_rows(outs["default-s0"] / "model.pt", splits, device, results, args.dry_run)),
            ("parity", lambda: parity(outs["default-s0"] / "model.pt", splits, device, results)),
        ):
            if name not in args.skip:
                step()
                write_results(args.out, results)
        for spec in args.run or RUNS:
            outs[spec.split(":", 1)[0]] = train_run(args, spec, splits, device, scratch, results)
            package_reports(args, outs)
            results["summary"] = summarise(results)
            write_results(args.out, results)
        if "benchmarks" not in args.skip:
            benchmarks(args, decode.root, results)  # type: ignore[attr-defined]
            write_results(args.out, results)
        if "probe" not in args.skip and time.perf_counter() - started < args.budget:
            compile_probe(args, splits, device, scratch, results)
        else:
            results["compile_probe"] = "skipped: " + ("--skip probe" if "probe" in args.skip else "time budget spent")
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, results)
    log(f"done in {results['total_seconds']} s; results in {args.out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", help="extracted ImageFolder CIFAR-10 (train/ and test/)")
    source.add_argument("--data-archive", help="cifar10-jpeg.tar.gz to extract first")
    parser.add_argument("--out", type=Path, help="output folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which the optional compile probe is skipped")
    parser.add_argument(
        "--wheels", type=Path, default=REPO / "benchmarks" / ".wheels", help="wheels of the peers (benchmarks/wheels.py)"
    )
    parser.add_argument(
        "--run",
        action="append",
        metavar="KEY:RECIPE:SEED[:FIELD=VALUE,...]",
        help=f"runs after {FIRST_RUN} (default: {', '.join(RUNS)})",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=SKIPPABLE,
        help="leave a step out (repeatable), to fit the device tool's 10 minutes a command",
    )
    parser.add_argument("--join", nargs=2, metavar=("PARTS_DIR", "DEST_DIR"), help="join a run's model parts and exit")
    args = parser.parse_args(argv)
    if not args.join and (not args.out or not (args.data_dir or args.data_archive)):
        parser.error("--out and one of --data-dir/--data-archive are required")
    for spec in args.run or ():
        parse_run(spec)  # a malformed run fails now, not after the first training
    return args


def decode(args, scratch: Path, results: dict):
    """Step 1: the JPEG splits decoded once into uint8 tensors (``decode.root``: the image folder)."""
    root = decode.root = data_root(args, scratch)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    splits = load_device_splits(root, download=False)
    results["decode_seconds"] = round(time.perf_counter() - t0, 2)
    log(f"decoded {len(splits[0])} train + {len(splits[1])} test images in {results['decode_seconds']} s")
    return splits


if __name__ == "__main__":
    raise SystemExit(main())
