"""Turn a pytest-benchmark session into ``benchmarks/RESULTS.md``: images/s and the ratio to the
floor (plain inference) per case and device, the issue's targets, and the machine."""

from __future__ import annotations

import datetime
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from explainkit.runtime.io import atomic_path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine_description() -> str:
    cpu = cpu_name()
    text = f"CPU: {cpu}, {torch.get_num_threads()} torch threads; torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


def _rows(benchmarks) -> list[dict[str, Any]]:
    rows = []
    for bench in benchmarks:
        info = dict(bench.extra_info)
        if "case" not in info or bench.stats is None:
            continue
        median = bench.stats.median
        info["median_s"] = median
        info["rounds_s"] = list(getattr(bench.stats, "data", []))
        info["ips"] = info.get("images", 0) / median if median else float("nan")
        floor = info.get("floor_median_s")
        info["interleaved"] = floor / median if floor and median else None
        info["group"] = bench.group
        rows.append(info)
    return rows


def _find(rows, group, case, layer=None):
    for row in rows:
        if row["group"] == group and row["case"] == case and (layer is None or row["layer"] == layer):
            return row
    return None


def _targets(rows, group) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, target text, met) for one device/batch/dtype group."""
    floor = _find(rows, group, "forward (inference_mode)")
    out = []

    def ratio(case, layer):
        row = _find(rows, group, case, layer)
        if row and row.get("interleaved"):
            return row["interleaved"]
        return row["ips"] / floor["ips"] if row and floor else None

    def speedup(fast_case, slow_case, layer, slow_layer=None):
        fast, slow = _find(rows, group, fast_case, layer), _find(rows, group, slow_case, slow_layer or layer)
        return fast["ips"] / slow["ips"] if fast and slow else None

    checks = [
        ("gradcam single target @layer4 / forward", ratio("gradcam single target", "layer4"), 0.90),
        ("gradcam++ single target @layer4 / forward", ratio("gradcam++ single target", "layer4"), 0.90),
        ("gradcam single target @layer3 / forward", ratio("gradcam single target", "layer3"), 0.70),
        ("all classes @layer4 / forward", ratio("gradcam all classes (one call)", "layer4"), 0.80),
        (
            "all classes @layer3 vs 10 calls of ours",
            speedup("gradcam all classes (one call)", "gradcam 10 single-target calls", "layer3"),
            2.5,
        ),
        (
            "all classes @layer3 vs 10 pytorch-grad-cam calls",
            speedup("gradcam all classes (one call)", "pytorch-grad-cam GradCAM 10 calls", "layer3"),
            6.0,
        ),
        (
            "gradcam vs pytorch-grad-cam GradCAM @layer4",
            speedup("gradcam single target", "pytorch-grad-cam GradCAM single target", "layer4"),
            2.5,
        ),
    ] + [
        (
            f"{ours} vs pytorch-grad-cam {theirs} @layer4",
            speedup(f"{ours} single target", f"pytorch-grad-cam {theirs} single target", "layer4"),
            2.5,
        )
        for ours, theirs in (
            ("xgradcam", "XGradCAM"),
            ("hirescam", "HiResCAM"),
            ("layercam", "LayerCAM"),
            ("gradcam-elementwise", "GradCAMElementWise"),
        )
    ]
    checks.append(
        (
            "eigencam vs pytorch-grad-cam EigenCAM @layer4",
            speedup("eigencam single target", "pytorch-grad-cam EigenCAM single target", "layer4"),
            1.5,
        )
    )
    for what, value, target in checks:
        out.append((what, value, f">= {target}x", None if value is None else value >= target))
    return out


def write_results(benchmarks, path: Path) -> None:
    rows = _rows(benchmarks)
    lines = [
        "# Explanation throughput",
        "",
        f"Written by `pytest --benchmark-only --write-results` on {datetime.date.today()}.",
        f"Machine: {machine_description()}.",
        "",
        "Protocol: all cases in one process, same model (ResNet18-CIFAR, random init — speed does not",
        "depend on the weights), batch, device and threads; one warm-up round, then the median of",
        "rounds (15; 21 for the forward; 3 for ten-call cases; 1 end to end); CUDA synchronised.",
        "Ratio to floor = images/s of the case / images/s of plain inference (`torch.inference_mode`) in the",
        "same group. Ratio to interleaved floor = the same, but against a plain forward timed before every",
        "round of that case (untimed by pytest-benchmark): robust to the CPU's speed drifting between cases,",
        "so the targets use it.",
        "",
    ]
    for group in dict.fromkeys(row["group"] for row in rows):
        in_group = [row for row in rows if row["group"] == group]
        lines += [f"## {group}", ""]
        if group.endswith("-memory"):
            lines += _memory_lines(in_group)
        elif group.endswith("-targets"):
            lines += _target_task_lines(in_group)
        else:
            lines += _throughput_lines(rows, group, in_group)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _memory_lines(in_group: list[dict]) -> list[str]:
    forward = next((r for r in in_group if r["case"] == "peak memory: forward"), None)
    lines = ["| case | batch | peak added (MiB) | ratio to forward |", "| --- | --- | --- | --- |"]
    for row in in_group:
        mib = row.get("peak_bytes", 0) / 2**20
        rel = row.get("peak_bytes", 0) / forward["peak_bytes"] if forward and forward.get("peak_bytes") else float("nan")
        lines.append(f"| {row['case']} | {row['batch']} | {mib:.1f} | {rel:.2f}x |")
    return lines + ["", "Target: all classes @layer4 <= 1.5x the forward's peak.", ""]


def _throughput_lines(rows: list[dict], group: str, in_group: list[dict]) -> list[str]:
    floor = _find(rows, group, "forward (inference_mode)") or next(
        (r for r in in_group if r["case"].startswith(("end to end: inference", "device-resident split: inference"))), None
    )
    lines = ["| case | layer | images/s | ratio to floor | ratio to interleaved floor |", "| --- | --- | --- | --- | --- |"]
    for row in in_group:
        rel = f"{row['ips'] / floor['ips']:.2f}x" if floor else "-"
        inter = f"{row['interleaved']:.2f}x" if row.get("interleaved") else "-"
        lines.append(f"| {row['case']} | {row['layer']} | {row['ips']:.1f} | {rel} | {inter} |")
    lines.append("")
    if any("library" in row for row in in_group):  # bench_methods.py: each method against its peers
        lines += _peer_lines(in_group)
    elif floor and floor["case"].startswith("forward"):  # single-batch groups
        lines += ["| target | measured | wanted | met |", "| --- | --- | --- | --- |"]
        for what, value, wanted, met in _targets(rows, group):
            shown = "n/a" if value is None else f"{value:.2f}x"
            lines.append(f"| {what} | {shown} | {wanted} | {'n/a' if met is None else ('yes' if met else '**no**')} |")
        lines.append("")
    elif group.endswith(("-scorecam", "-perturbation")):
        lines += _perturbation_lines(rows, group)
    elif floor and group.endswith("-device-resident"):
        lines += _device_resident_lines(in_group)
    elif floor:
        lines += [
            f"Target: explain >= 0.80x inference over the same loader ({in_group[-1].get('images')} images, "
            f"{in_group[-1].get('source', '')}).",
            "",
        ]
    return lines


def _peer_lines(in_group: list[dict]) -> list[str]:
    """``bench_methods.py``: explainkit's native method against each peer's version on the same
    work (model, layers, images, one map per image and class): speedup = the peer's median time /
    explainkit's, and the same per round against the interleaved floors (drift-robust)."""
    ours = {(r["method"], r["kind"]): r for r in in_group if r.get("library") == "explainkit"}
    lines = [
        "| method | targets | peer | explainkit images/s | peer images/s | speedup | speedup vs interleaved floors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for peer in (r for r in in_group if r.get("library") not in (None, "explainkit")):
        mine = ours.get((peer["method"], peer["kind"]))
        shown = f"{mine['ips']:.1f}" if mine else "not registered"
        ratio = _times(peer["median_s"] / mine["median_s"]) if mine else "n/a"
        paired = (
            _times(mine["interleaved"] / peer["interleaved"])
            if mine and mine.get("interleaved") and peer.get("interleaved")
            else "n/a"
        )
        lines.append(
            f"| {peer['method']} | {peer['kind']} | {peer['library']} | {shown} | {peer['ips']:.1f} | {ratio} | {paired} |"
        )
    return lines + [""]


def _perturbation_lines(rows: list[dict], group: str) -> list[str]:
    lines: list[str] = []
    for method, peer_name, wanted in (("scorecam", "ScoreCAM", 1.2), ("ablationcam", "AblationCAM", 5.0)):
        single, every, peer = (
            _find(rows, group, c)
            for c in (f"{method} single target", f"{method} all classes", f"pytorch-grad-cam {peer_name} single target")
        )
        if single and peer:
            lines += [
                f"{method} vs pytorch-grad-cam {peer_name}, single target @layer4: "
                f"{peer['median_s'] / single['median_s']:.2f}x (target >= {wanted}x).",
                "",
            ]
        if single and every:
            lines += [
                f"{method} all classes / single target time: {every['median_s'] / single['median_s']:.2f}x (target <= 1.5x).",
                "",
            ]
    return lines


def _device_resident_lines(in_group: list[dict]) -> list[str]:
    every = next((r for r in in_group if "all classes" in r["case"]), None)
    if not every:
        return []
    seconds = every["median_s"]
    met = "yes" if seconds < 1.0 else "**no**"
    return [
        f"All ten classes' GradCAM at layer4 for {every['images']} images ({every.get('source', '')}): "
        f"{seconds:.3f} s (median of 3). Target on a GPU, whole 10,000-image split: < 1 s — "
        f"{met if every['device'] == 'cuda' and every['images'] >= 10000 else 'n/a here'}.",
        "",
    ]


TARGET_TASK_SPEEDUP = 2.0  # explainkit's batched call vs pytorch-grad-cam on the same work, per task (CPU)


def _target_task_lines(in_group: list[dict]) -> list[str]:
    """Targets beyond a class (``bench_targets.py``): per task, maps/s of both libraries and their
    ratio, also against explainkit timed before every pytorch-grad-cam round (robust to drift)."""
    lines = [
        "| task | layer | images | maps per call | explainkit maps/s | pytorch-grad-cam maps/s | ratio | interleaved ratio | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(row["task"] for row in in_group):
        ours = next((r for r in in_group if r["task"] == task and r["library"] == "explainkit"), None)
        peer = next((r for r in in_group if r["task"] == task and r["library"] == "pytorch-grad-cam"), None)
        if ours is None:
            continue
        maps = ours.get("maps", ours["images"])
        ratio = peer["median_s"] / ours["median_s"] if peer else None
        paired = _paired_ratio(peer) if peer else None
        judged = min((r for r in (ratio, paired) if r is not None), default=None)  # both must meet it
        met = "n/a" if judged is None else ("yes" if judged >= TARGET_TASK_SPEEDUP else "**no**")
        lines.append(
            f"| {task} | {ours['layer']} | {ours['images']} | {maps} | {maps / ours['median_s']:.1f} | "
            + (f"{maps / peer['median_s']:.1f}" if peer else "n/a")
            + f" | {_times(ratio)} | {_times(paired)} | {met} |"
        )
    return lines + [
        "",
        "Ratio = pytorch-grad-cam's median time / explainkit's, both on the same work (same model, layer, images, one "
        "map per image, box or label). Interleaved ratio = the median over pytorch-grad-cam's rounds of its time / "
        "explainkit's timed on the same work just before that round (a busy spell of a shared CPU hits both sides "
        f"of a pair). Target: >= {TARGET_TASK_SPEEDUP}x per task on the CPU, met when both ratios reach it.",
        "",
    ]


def _paired_ratio(peer: dict) -> float | None:
    ours, theirs = peer.get("ours_interleaved_s") or [], peer.get("rounds_s") or []
    if not ours or len(ours) != len(theirs):
        return None
    return statistics.median(t / o for t, o in zip(theirs, ours))


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
