"""Explanation throughput against the floor (plain inference) and the peers.

Run: ``pytest --benchmark-only`` (add ``--write-results`` for ``benchmarks/RESULTS.md``).
Each case records its images/s; ratios to the forward of the same device/batch/dtype group are
computed by ``benchmarks/report.py``.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from benchmarks import cases
from benchmarks.conftest import cuda_configs, full_size

LAYERS = ("layer4", "layer3")


def settings(config_full: bool):
    """(device, batch, dtype) per group: CPU batch 64 always, CUDA 256/1024 x fp32/bf16 when present."""
    out = [("cpu", 64 if config_full else 4, None)]
    if torch.cuda.is_available():
        out += [("cuda", b if config_full else 4, d) for b, d in (cuda_configs() if config_full else [(4, None)])]
    return out


def pytest_generate_tests(metafunc):
    if "setting" in metafunc.fixturenames:
        params = settings(full_size(metafunc.config))
        ids = [f"{d}-b{b}-{'bf16' if t else 'fp32'}" for d, b, t in params]
        metafunc.parametrize("setting", params, ids=ids, scope="module")


@pytest.fixture(scope="module")
def prepared(setting, bench_model):
    device_name, batch, dtype = setting
    device = torch.device(device_name)
    model = bench_model.to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return model, images, device, batch, dtype


def measure(benchmark, prepared, case: str, fn, layer: str = "-", rounds: int = 15):
    """Time ``fn`` with pytest-benchmark; before every round (untimed by it) also time one plain
    forward, so each case carries its own interleaved floor: the machine's speed drifts between
    cases on a shared CPU, and a ratio of medians measured minutes apart inherits that drift."""
    model, images, device, batch, dtype = prepared
    group = f"{device.type}-b{batch}-{'bf16' if dtype else 'fp32'}"
    benchmark.group = group
    benchmark.extra_info.update(
        case=case,
        layer=layer,
        device=device.type,
        batch=batch,
        dtype="bf16" if dtype else "fp32",
        threads=torch.get_num_threads(),
        images=batch,
        machine=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    )

    def synced(f):
        def call():
            result = f()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return result

        return call

    run, floor = synced(fn), synced(cases.forward(model, images, dtype))
    floor_times: list[float] = []

    def time_floor():
        start = time.perf_counter()
        floor()
        floor_times.append(time.perf_counter() - start)

    benchmark.pedantic(run, setup=time_floor, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["floor_median_s"] = statistics.median(floor_times[1:] or floor_times)


def test_forward_floor(benchmark, prepared):
    model, images, _, _, dtype = prepared
    measure(benchmark, prepared, "forward (inference_mode)", cases.forward(model, images, dtype), rounds=21)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "captum-gradcam"])
def test_ours_single_target(benchmark, prepared, name, layer):
    model, images, _, _, dtype = prepared
    if name == "captum-gradcam" and dtype is not None:
        pytest.skip("captum-gradcam has no autocast option")
    if name == "captum-gradcam":
        pytest.importorskip("captum")
    measure(benchmark, prepared, f"{name} single target", cases.ours(name, model, images, layer, dtype=dtype), layer)


@pytest.mark.parametrize("layer", LAYERS)
def test_ours_all_classes(benchmark, prepared, layer):
    model, images, _, _, dtype = prepared
    measure(
        benchmark, prepared, "gradcam all classes (one call)", cases.ours("gradcam", model, images, layer, "all", dtype), layer
    )


@pytest.mark.parametrize("layer", LAYERS)
def test_ours_ten_single_calls(benchmark, prepared, layer):
    model, images, _, _, dtype = prepared
    measure(
        benchmark, prepared, "gradcam 10 single-target calls", cases.ours_ten_calls(model, images, layer, dtype), layer, rounds=3
    )


def _fp32_only(prepared, peer: str):
    if prepared[4] is not None:
        pytest.skip("peers run in fp32 (pytorch-grad-cam converts to numpy)")
    pytest.importorskip(peer)


@pytest.mark.parametrize("layer", LAYERS)
def test_pytorch_grad_cam_ten_calls(benchmark, prepared, layer):
    _fp32_only(prepared, "pytorch_grad_cam")
    model, images = prepared[:2]
    measure(
        benchmark,
        prepared,
        "pytorch-grad-cam GradCAM 10 calls",
        cases.pgc("gradcam", model, images, layer, range(10)),
        layer,
        rounds=3,
    )


@pytest.mark.parametrize("layer", LAYERS)
def test_captum_ten_calls(benchmark, prepared, layer):
    _fp32_only(prepared, "captum")
    model, images = prepared[:2]
    measure(benchmark, prepared, "captum LayerGradCam 10 calls", cases.captum(model, images, layer, range(10)), layer, rounds=3)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_pytorch_grad_cam_single_target(benchmark, prepared, method):
    _fp32_only(prepared, "pytorch_grad_cam")
    model, images = prepared[:2]
    label = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus"}[method]
    measure(benchmark, prepared, f"pytorch-grad-cam {label} single target", cases.pgc(method, model, images, "layer4"), "layer4")


def test_captum_single_target(benchmark, prepared):
    _fp32_only(prepared, "captum")
    model, images = prepared[:2]
    measure(benchmark, prepared, "captum LayerGradCam single target", cases.captum(model, images, "layer4"), "layer4")


NATIVE_ZOO = ["xgradcam", "hirescam", "layercam", "gradcam-elementwise", "eigencam"]


@pytest.mark.parametrize("method", NATIVE_ZOO)
def test_native_zoo_single_target(benchmark, prepared, method):
    model, images, _, _, dtype = prepared
    measure(benchmark, prepared, f"{method} single target", cases.ours(method, model, images, "layer4", dtype=dtype), "layer4")


@pytest.mark.parametrize("method", NATIVE_ZOO)
def test_pytorch_grad_cam_native_zoo_single_target(benchmark, prepared, method):
    _fp32_only(prepared, "pytorch_grad_cam")
    model, images = prepared[:2]
    label = cases.PGC_CLASSES[method]
    measure(benchmark, prepared, f"pytorch-grad-cam {label} single target", cases.pgc(method, model, images, "layer4"), "layer4")


PERTURBATION_CASES = [
    f"{method} {case}" for method in ("scorecam", "ablationcam") for case in ("single target", "all classes")
] + ["pytorch-grad-cam ScoreCAM single target", "pytorch-grad-cam AblationCAM single target"]


@pytest.mark.parametrize("case", PERTURBATION_CASES)
def test_perturbation(benchmark, bench_model, case, request):
    """Score-CAM and Ablation-CAM cost a forward per channel (512 at layer4), so they run on
    2 images on the CPU in their own group."""
    if case.startswith("pytorch"):
        pytest.importorskip("pytorch_grad_cam")
    images = torch.randn(2 if full_size(request.config) else 1, 3, 32, 32)
    model = bench_model.to("cpu")
    if case.startswith("pytorch"):
        run = cases.pgc("ablationcam" if "Ablation" in case else "scorecam", model, images, "layer4")
    else:
        method, _ = case.split(" ", 1)
        run = cases.ours(method, model, images, "layer4", "all" if "all" in case else None)
    benchmark.group = "cpu-perturbation"
    benchmark.extra_info.update(
        case=case,
        layer="layer4",
        device="cpu",
        batch=len(images),
        dtype="fp32",
        threads=torch.get_num_threads(),
        images=len(images),
        machine="cpu",
    )
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
