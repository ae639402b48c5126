"""Train recipe variants on the device-resident data path and compare them, on one GPU.

    python benchmarks/recipe_sweep.py --data-archive PATH/cifar10-jpeg.tar.gz --out OUT \
        --variant lr04:default:lr=0.4 --variant bs256:default:batch_size=256 ...
    python benchmarks/recipe_sweep.py --dry-run --data-dir DIR --out OUT --variant a:default:lr=0.1

A variant is ``NAME:RECIPE[:FIELD=VALUE,...]``: any :class:`~explainkit.training.recipes.Recipe`
field, plus ``lr_find_iters``. Every variant trains with seed 0; then the best ``default``-based
variant by test accuracy also trains with seed 1 (``--confirm``), and its seed-0 model is packaged
like ``gpu.py`` packages one (fp16 safetensors in parts + card + reports). Variants are compared on
the test split (CIFAR-10 has no validation split), so the winner's accuracy is optimistic by
selection; its seed-1 run, not used for the choice, is the fairer figure.

Also profiles one all-classes GradCAM call at layer4 against a forward (batch 1024) into
``OUT/profile.txt``, to show where explanation time goes on the GPU.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.gpu import data_root, environment, log, package_model, package_reports, write_results  # noqa: E402
from explainkit.training.recipes import resolve_recipe  # noqa: E402
from explainkit.training.trainer import TrainConfig, load_device_splits, train  # noqa: E402


def parse_variant(text: str) -> tuple[str, str, dict]:
    name, recipe, *rest = text.split(":", 2)
    overrides: dict = {}
    for item in filter(None, (rest[0] if rest else "").split(",")):
        key, value = item.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return name, recipe, overrides


@dataclass
class Sweep:
    """What every variant of one sweep shares: the flags, the decoded splits, the device, a scratch
    folder and the results being collected."""

    args: argparse.Namespace
    splits: object
    device: torch.device
    scratch: Path
    results: dict


def run_variant(sweep: Sweep, name: str, recipe_name: str, overrides: dict, seed: int) -> Path:
    args, splits, device, scratch, results = sweep.args, sweep.splits, sweep.device, sweep.scratch, sweep.results
    overrides = dict(overrides)
    lr_find_iters = int(overrides.pop("lr_find_iters", 100))
    if args.dry_run:
        overrides.update(epochs=1, batch_size=32, train_limit=128, test_limit=64)
        lr_find_iters = min(lr_find_iters, 20)
    recipe = resolve_recipe(recipe_name, **overrides)
    out = scratch / f"{name}-s{seed}"
    result = train(
        recipe,
        TrainConfig(
            out,
            device=device,
            seed=seed,
            data_path="device",
            splits=splits,
            lr_find_iters=lr_find_iters,
            progress=False,
            reports=seed == 0,
        ),
    )
    last = result.history[-1]
    results["runs"][f"{name}-s{seed}"] = {
        "variant": name,
        "recipe": recipe_name,
        "overrides": overrides,
        "seed": seed,
        "max_lr": recipe.lr if recipe.lr != "auto" else None,
        "test_accuracy": result.test_accuracy,
        "train_accuracy": last["train_accuracy"],
        "train_seconds": round(result.train_seconds, 2),
        "test_accuracy_per_epoch": [round(r["test_accuracy"], 4) for r in result.history],
    }
    import json

    card = json.loads((out / "model.json").read_text())
    results["runs"][f"{name}-s{seed}"]["max_lr"] = card["recipe"]["lr"]
    log(
        f"{name} seed {seed}: {100 * result.test_accuracy:.2f}% (train {100 * last['train_accuracy']:.2f}%) "
        f"in {result.train_seconds:.1f} s, max_lr {card['recipe']['lr']}"
    )
    write_results(args.out, results)
    return out


def profile(device: torch.device, out: Path, batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from explainkit.explainers.gradient import GradCAM
    from explainkit.models.store import resnet18_cifar

    model = resnet18_cifar(10).eval().to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    explainer = GradCAM(model, "layer4")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sections = []
    for label, fn in (
        ("forward (inference_mode)", lambda: model(images)),
        ("gradcam single target", lambda: explainer(images)),
        ("gradcam all classes", lambda: explainer(images, targets="all")),
    ):
        for _ in range(3):  # warm-up (cudnn autotuning)
            with torch.inference_mode(label.startswith("forward")):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with torch_profile(activities=activities) as prof:
            with torch.inference_mode(label.startswith("forward")):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        sections.append(f"## {label} (batch {batch})\n{prof.key_averages().table(sort_by=sort, row_limit=25)}")
    out.write_text("\n\n".join(sections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir")
    source.add_argument("--data-archive")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME:RECIPE[:FIELD=VALUE,...]")
    parser.add_argument("--confirm", action="store_true", help="train the best default-based variant again with seed 1")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which no new run starts")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    results: dict = {"environment": environment(), "dry_run": args.dry_run, "runs": {}, "skipped": []}
    variants = [parse_variant(v) for v in args.variant]
    profile(device, args.out / "profile.txt", 16 if args.dry_run else 1024)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = args.scratch = Path(tmp)
        splits = load_device_splits(data_root(args, scratch), download=False)
        outs = {}
        sweep = Sweep(args, splits, device, scratch, results)
        for name, recipe_name, overrides in variants:
            if time.perf_counter() - started > args.budget:
                results["skipped"].append(name)
                continue
            outs[name] = run_variant(sweep, name, recipe_name, overrides, 0)
        candidates = [r for r in results["runs"].values() if r["recipe"] == "default"]
        if candidates:
            best = max(candidates, key=lambda r: r["test_accuracy"])["variant"]
            results["best_default_variant"] = best
            package_model(args, outs[best] / "model.pt", results)
            package_reports(args, {best: outs[best]})
            if args.confirm and time.perf_counter() - started < args.budget + 60:
                spec = next(v for v in variants if v[0] == best)
                run_variant(sweep, best, spec[1], spec[2], 1)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, results)
    log(f"done in {results['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
