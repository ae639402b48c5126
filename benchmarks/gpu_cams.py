"""``gpu.py``'s CAM rows: eager vs captured (CUDA graphs) vs a plain forward, the whole test split
from resident tensors, Score-CAM and the newer methods against pytorch-grad-cam, on one GPU.

Every row is timed the same way: two warm-up calls, then the median of ``reps`` calls, each
synchronised (CUDA). On the CPU (``gpu.py --dry-run``) the same code runs at toy size, the
captured path in ``mode="static"`` (the capture's bookkeeping without a graph): only to keep the
step from rotting, its timings mean nothing.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

import torch

from benchmarks import cases
from explainkit.explainers.gradient import GradCAM
from explainkit.explainers.graphs import CapturedCAM
from explainkit.runtime.device import device_layout

#: the newer native methods and, where it exists, their pytorch-grad-cam reference (``pgc-NAME``)
NEW_METHODS = (
    "finercam",
    "shapleycam",
    "kpcacam",
    "fem",
    "fullgrad",
    "guided-gradcam",
    "refinecam",
    "polycam",
    "opticam",
    "rollout",
    "chefer2021",
    "legrad",
)


#: warm-up calls before each timing (0 in the dry run: its timings mean nothing, its time matters)
WARMUP = {"calls": 2}


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int | None = None) -> float:
    """Median seconds of ``reps`` synchronised calls of ``fn`` after ``warmup`` calls (default
    ``WARMUP["calls"]``, and never more than it)."""
    warmup = WARMUP["calls"] if warmup is None else min(warmup, WARMUP["calls"])

    def once() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(max(1, reps)))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.float() - b.float()).abs().max()), 7)


def _mean_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(0, -3).flatten(1).float().cpu(), b.flatten(0, -3).flatten(1).float().cpu()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    flat = (a.norm(dim=1) < 1e-6) & (b.norm(dim=1) < 1e-6)
    return round(float(torch.where(flat, torch.ones_like(corr), corr).mean()), 5)


def capture_mode(device: torch.device) -> str:
    return "cuda-graph" if device.type == "cuda" else "static"


def captured_rows(model: torch.nn.Module, images: torch.Tensor, device: torch.device, reps: int) -> dict:
    """Grad-CAM at layer4, single target and all classes, fp32 and bf16: a plain forward, the eager
    explainer and the captured one; captured-vs-eager parity (max abs difference of the maps)."""
    out: dict = {"batch": len(images), "mode": capture_mode(device)}
    for dtype in (None, torch.bfloat16):
        label = "bf16" if dtype else "fp32"
        eager = GradCAM(model, "layer4", autocast=dtype)
        captured = CapturedCAM(GradCAM(model, "layer4", autocast=dtype), capture_mode(device))
        forward_s = timed(cases.forward(model, images, dtype), device, reps)
        rows: dict = {"forward_seconds": round(forward_s, 6)}
        for targets, name in ((None, "single"), ("all", "all_classes")):
            want, got = eager(images, targets), captured(images, targets)
            eager_s = timed(lambda e=eager, t=targets: e(images, t), device, reps)
            captured_s = timed(lambda c=captured, t=targets: c(images, t), device, reps)
            rows[name] = {
                "eager_seconds": round(eager_s, 6),
                "captured_seconds": round(captured_s, 6),
                "eager_vs_forward": round(forward_s / eager_s, 3),
                "captured_vs_forward": round(forward_s / captured_s, 3),
                "captured_path": captured.last_path,
                "max_abs_diff_captured_vs_eager": _max_diff(got, want),
                "fallbacks": list(captured.fallbacks.values()),
            }
        if device.type == "cuda":  # the alternative: torch.compile(mode="reduce-overhead")
            rows["compile"] = _compile_row(model, images, dtype, device, reps, forward_s)
        out[label] = rows
    return out


def _compile_row(model, images, dtype, device, reps, forward_s) -> dict:
    try:
        compiled = CapturedCAM(GradCAM(model, "layer4", autocast=dtype), "compile")
        started = time.perf_counter()
        want, got = GradCAM(model, "layer4", autocast=dtype)(images, "all"), compiled(images, "all")
        first = time.perf_counter() - started
        seconds = timed(lambda: compiled(images, "all"), device, reps)
        return {
            "all_classes_seconds": round(seconds, 6),
            "all_classes_vs_forward": round(forward_s / seconds, 3),
            "first_call_seconds": round(first, 2),
            "max_abs_diff_vs_eager": _max_diff(got, want),
            "path": compiled.last_path,
            "fallbacks": list(compiled.fallbacks.values()),
        }
    except Exception as exc:  # an optional comparison: its failure is a result, not the run's end
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def split_rows(model: torch.nn.Module, images: torch.Tensor, device: torch.device, chunks: tuple[int, ...], reps: int) -> dict:
    """All ten classes' Grad-CAM at layer4 for the whole (normalised, resident) test split, in
    chunks of each size, fp32 and bf16 autocast: eager and captured wall time of the whole sweep."""
    out: dict = {"images": len(images), "target_seconds": 0.05}
    for dtype in (None, torch.bfloat16):
        for chunk in chunks:
            eager = GradCAM(model, "layer4", autocast=dtype)
            captured = CapturedCAM(GradCAM(model, "layer4", autocast=dtype), capture_mode(device), max_graphs=2)
            parts = images.split(chunk)
            out[f"{'bf16' if dtype else 'fp32'}-chunk{chunk}"] = {
                "eager_seconds": round(timed(lambda e=eager, ps=parts: [e(p, "all") for p in ps], device, reps), 5),
                "captured_seconds": round(timed(lambda c=captured, ps=parts: [c(p, "all") for p in ps], device, reps), 5),
                "fallbacks": list(captured.fallbacks.values()),
            }
            captured.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    best = min(min(v["eager_seconds"], v["captured_seconds"]) for v in out.values() if isinstance(v, dict))
    out["best_seconds"] = best
    out["met"] = best <= out["target_seconds"]
    return out


def peer_rows(model: torch.nn.Module, images: torch.Tensor, device: torch.device, reps: int) -> dict:
    """Single-target Grad-CAM at layer4, fp32: ours eager and captured against pytorch-grad-cam and
    Captum's LayerGradCam on the same images."""
    ours = GradCAM(model, "layer4")
    captured = CapturedCAM(GradCAM(model, "layer4"), capture_mode(device))
    out: dict = {"batch": len(images)}
    out["ours_seconds"] = round(timed(lambda: ours(images), device, reps), 6)
    out["ours_captured_seconds"] = round(timed(lambda: captured(images), device, reps), 6)
    for name, make in (
        ("pytorch-grad-cam", lambda: cases.pgc("gradcam", model, images, "layer4")),
        ("captum", lambda: cases.captum(model, images, "layer4")),
    ):
        try:
            seconds = timed(make(), device, max(1, reps // 3), warmup=1)
            out[f"{name}_seconds"] = round(seconds, 6)
            out[f"ours_vs_{name}"] = round(seconds / out["ours_seconds"], 2)
            out[f"captured_vs_{name}"] = round(seconds / out["ours_captured_seconds"], 2)
        except ImportError as exc:
            out[f"{name}_seconds"] = f"not installed: {exc}"
    return out


def scorecam_rows(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, layer: str = "layer4", reps: int = 3
) -> dict:
    """Score-CAM (a masked forward per channel: 512 per image at layer4): ours against
    pytorch-grad-cam's, one map per image for its predicted class."""
    import explainkit

    ours = explainkit.get_explainer("scorecam", model, layer=layer)
    out: dict = {"images": len(images), "layer": layer, "target_ratio": 3.0}
    out["ours_seconds"] = round(timed(lambda: ours(images), device, reps, warmup=1), 4)
    try:
        out["pytorch_grad_cam_seconds"] = round(timed(cases.pgc("scorecam", model, images, layer), device, 1, warmup=1), 4)
    except ImportError as exc:
        out["pytorch_grad_cam_seconds"] = f"not installed: {exc}"
        return out
    out["ratio"] = round(out["pytorch_grad_cam_seconds"] / out["ours_seconds"], 2)
    out["met"] = out["ratio"] >= out["target_ratio"]
    return out


def ensure_zoo() -> bool:
    """The ``pgc-*`` references: the gradcam-zoo plugin, registered from the repository when it is
    not installed (the GPU machine runs explainkit from the checkout, without entry points)."""
    import explainkit
    from benchmarks.gpu import REPO

    if "pgc-gradcam" in explainkit.list_explainers():
        return True
    sys.path.insert(0, str(REPO / "plugins" / "explainkit-gradcam-zoo"))
    try:
        import explainkit_gradcam_zoo
    except ImportError:
        return False
    explainkit.plugin_manager().register(explainkit_gradcam_zoo, name="gradcam_zoo")
    return "pgc-gradcam" in explainkit.list_explainers()


#: options that make a native method compute what its pytorch-grad-cam reference computes by default
#: (pgc's RefineCAM fuses Grad-CAM++ maps; ours defaults to Grad-CAM)
SAME_AS_PGC = {"refinecam": {"method": "gradcam++"}}


def method_rows(model: torch.nn.Module, images: torch.Tensor, device: torch.device, reps: int) -> dict:
    """Each newer native method that is registered (``explainkit.list_explainers()``), timed on
    ``images`` with each image's predicted class, against its ``pgc-`` reference when there is one:
    seconds, the speed ratio, max abs difference and mean correlation of the maps. Missing methods
    are listed as such; a method that fails on this model records its error."""
    import explainkit

    zoo = ensure_zoo()
    names = set(explainkit.list_explainers())
    out: dict = {"images": len(images), "zoo": zoo, "missing": [m for m in NEW_METHODS if m not in names]}
    for method in NEW_METHODS:
        if method not in names:
            continue
        row: dict = {}
        try:
            # the timed calls keep their maps (the dry run's one call is both the timing and the maps)
            maps: dict[str, torch.Tensor] = {}
            ours = explainkit.get_explainer(method, model, layer="layer4", **SAME_AS_PGC.get(method, {}))
            row["ours_seconds"] = round(timed(lambda o=ours, m=maps: m.update(ours=o(images)), device, reps, warmup=1), 5)
            if f"pgc-{method}" in names:
                reference = explainkit.get_explainer(f"pgc-{method}", model, layer="layer4")
                row["pgc_seconds"] = round(timed(lambda r=reference, m=maps: m.update(pgc=r(images)), device, 1, warmup=1), 5)
                row["ratio"] = round(row["pgc_seconds"] / row["ours_seconds"], 2)
                row["max_abs_diff"] = _max_diff(maps["ours"].cpu(), maps["pgc"].cpu())
                row["mean_corr"] = _mean_corr(maps["ours"], maps["pgc"])
        except Exception as exc:  # one method's failure is its row, not the run's end
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        out[method] = row
    return out


def run_cam_rows(model: torch.nn.Module, test_images: torch.Tensor, device: torch.device, dry_run: bool) -> dict:
    """Every row above; ``test_images``: the normalised test split (float, on ``device``)."""
    model = device_layout(model.to(device).eval(), device)
    test_images = device_layout(test_images, device)
    batch = test_images[: 4 if dry_run else 1024]
    reps = 1 if dry_run else 20
    WARMUP["calls"] = 0 if dry_run else 2
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("gradcam_captured", lambda: captured_rows(model, batch, device, reps)),
        ("all_classes_split", lambda: split_rows(model, test_images, device, (20,) if dry_run else (1000, 2500, 5000, 10000), 1 if dry_run else 5)),
        ("peers_single_target", lambda: peer_rows(model, batch, device, reps)),
        # the dry run at layer1 (64 channels): layer4's 512 masked forwards take a minute on 2 cores
        ("scorecam", lambda: scorecam_rows(model, test_images[: 1 if dry_run else 16], device, "layer1" if dry_run else "layer4", reps)),
        ("new_methods", lambda: method_rows(model, test_images[: 2 if dry_run else 64], device, 1 if dry_run else 5)),
    ]  # fmt: skip
    for key, step in steps:
        started = time.perf_counter()
        try:
            results[key] = step()
        except Exception as exc:  # record and go on: the other rows still count
            results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        results[key]["step_seconds"] = round(time.perf_counter() - started, 2)
    return results
