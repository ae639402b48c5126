"""``explainkit serve`` under load, driven over HTTP by real API clients, and a soak for leaks.

The server is the real command, ``python -m explainkit serve --checkpoint ... --device cpu``, in its
own process, on a random-init CIFAR ResNet18 saved to a temporary checkpoint (no download). Each of
``USERS`` threads holds its own ``gradio_client.Client`` and sends its requests one after another
to the named ``/explain`` endpoint: one image per request (one of four distinct small PNGs, two of
them not 32x32 so the server resizes), ``gradcam``, ``gradcam++`` or both, opacity 1 with the
``viridis`` colour map. A thread samples the server's resident set size (psutil, the process and
any children) every 0.2 s.

What is checked, for every answer: against maps and probabilities computed directly in this
process from the same checkpoint (``explainkit.load_model``, ``model.card.preprocess``,
``explainkit.get_explainer(method, model)`` for the predicted class; computed once per image and
method before the load starts, so checking costs the server no CPU):

* one overlay per method asked, captioned ``"file: method @ default layer: class"``;
* the predicted class and the top-5 classes in order, each probability within 1e-5;
* the map itself: at opacity 1 an overlay is exactly the colour-mapped map, so each pixel is
  decoded back to its index in matplotlib's 256-entry viridis table; the decoded map must be
  within 3/256 of the direct map everywhere (one table step, plus the two entries that coincide
  once the table is cast to bytes).

Found by it (gradio 6.31): when two requests produce byte-identical overlays at once (the same
image and method from two users), Gradio's ``processing_utils.save_pil_to_cache`` rewrites the
one content-addressed cache file in place (``write_bytes``, not atomic), so a client downloading
it meanwhile gets an empty or cut file: about 1% of answers at full size. Distinct images never
collide. The benchmark fails on it until the app writes overlays atomically.

Phases, in one server: a warm-up request, then the load (``USERS`` x ``LOAD_REQUESTS``), whose
latencies give p50/p90/p99 and requests/s, then the soak, the same users continuing until
``SOAK_TOTAL`` requests in all. The RSS is read (after a 1 s pause) once the load's requests are
answered and once all are: at full size, 4 users x 25 = 100 and 1,000 requests in all, and
``RSS@1000 <= 1.10 x RSS@100`` is asserted. A plain ``pytest`` run is tiny (2 users x 4 requests,
16 in all, no RSS assertion). ``--benchmark-only --write-results`` rewrites the "Serving under
load" section of ``benchmarks/RESULTS.md`` (after ``benchmarks/report.py`` writes the rest).
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.conftest import full_size

SECTION = "## Serving under load"
METHOD_MIX = (("gradcam",), ("gradcam++",), ("gradcam", "gradcam++"))
COLORMAP = "viridis"
MAP_TOLERANCE = 3 / 256
PROBABILITY_TOLERANCE = 1e-5
RSS_GROWTH = 1.10
SAMPLE_EVERY_S = 0.2
STARTUP_TIMEOUT_S = 180


@dataclass(frozen=True)
class Size:
    users: int
    load_requests: int  # per user
    soak_total: int  # requests in all, load included
    assert_rss: bool


FULL = Size(users=4, load_requests=25, soak_total=1000, assert_rss=True)
SMALL = Size(users=2, load_requests=4, soak_total=16, assert_rss=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from explainkit.models.card import ModelCard
    from explainkit.models.store import resnet18_cifar, save_model

    torch.manual_seed(0)
    model = resnet18_cifar(10)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as the tests' random model
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return save_model(model.eval(), ModelCard(), tmp_path_factory.mktemp("serve-ckpt") / "model.pt")


@pytest.fixture(scope="module")
def launched(checkpoint, tmp_path_factory):
    """``explainkit serve`` started in its own process, ``(process, log)``; stopped after the module."""
    pytest.importorskip("gradio", reason="needs gradio (explainkit[ui])")
    pytest.importorskip("gradio_client", reason="needs gradio_client (comes with gradio)")
    pytest.importorskip("psutil", reason="needs psutil (the dev extra)")
    folder = tmp_path_factory.mktemp("serve")
    log = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "EXPLAINKIT_DATA_DIR"}  # no gallery: uploads only
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    command = [sys.executable, "-m", "explainkit", "serve", "--checkpoint", str(checkpoint)]
    command += ["--port", str(_free_port()), "--device", "cpu"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    try:
        yield process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(launched, expected) -> tuple[str, int]:
    """``(url, pid)`` once the server answers; it boots while ``expected`` is computed."""
    process, log = launched
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        for line in log.read_text().splitlines():
            if line.startswith("explainkit serve: http"):
                return line.split(": ", 1)[1].strip(), process.pid
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"explainkit serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def expected(checkpoint, tmp_path_factory) -> dict[str, Any]:
    """The request images and, per (image, method), what the library computes directly."""
    import explainkit

    folder = tmp_path_factory.mktemp("serve-images")
    rng = np.random.default_rng(7)
    shapes = {"noise.png": (32, 32), "wide.png": (40, 48), "small.png": (24, 24), "smooth.png": (32, 32)}
    model = explainkit.load_model(str(checkpoint))
    classes = list(model.card.classes)
    images, answers = {}, {}
    for name, (height, width) in shapes.items():
        if name == "smooth.png":
            ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
            pixels = np.broadcast_to(ramp, (height, width, 3)) * np.array([1.0, 0.6, 0.3])
            pixels = pixels.astype(np.uint8)
        else:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / name
        Image.fromarray(pixels).save(path)
        images[name] = str(path)
        batch = model.card.preprocess(Image.open(path))
        with torch.no_grad():
            probabilities = model(batch).softmax(1)[0]
        predicted = int(probabilities.argmax())
        top = probabilities.topk(5)
        maps = {}
        for method in ("gradcam", "gradcam++"):
            heat = explainkit.get_explainer(method, model)(batch, targets=torch.tensor([predicted]))
            maps[method] = heat.reshape(heat.shape[-2:]).float().numpy()
            assert maps[method].std() > 0, f"{name} {method}: a flat map would make the comparison vacuous"
        answers[name] = {
            "predicted": classes[predicted],
            "top": [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)],
            "maps": maps,
        }
    return {"images": images, "answers": answers}


def _viridis_table() -> np.ndarray:
    import matplotlib

    table = matplotlib.colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3]
    return (table * 255).astype(np.uint8).astype(np.int32)  # how the app casts a blended overlay


TABLE = _viridis_table()


def decode_map(path: str) -> np.ndarray:
    """An opacity-1 viridis overlay back to its map: each pixel's nearest table entry, mid-step."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    distance = ((pixels[:, :, None, :] - TABLE[None, None]) ** 2).sum(-1)
    return (distance.argmin(-1) + 0.5) / 256


def check(name: str, methods: tuple[str, ...], overlays: list[dict], answers: list[dict], expected: dict) -> None:
    """Raise AssertionError unless the API's answer matches the directly computed one."""
    want = expected["answers"][name]
    (answer,) = answers
    assert answer["image"] == name and answer["predicted"] == want["predicted"], (answer, want["predicted"])
    assert list(answer["top"]) == [cls for cls, _ in want["top"]], (answer["top"], want["top"])
    for cls, probability in want["top"]:
        assert abs(answer["top"][cls] - probability) <= PROBABILITY_TOLERANCE, (cls, answer["top"][cls], probability)
    assert [pane["caption"] for pane in overlays] == [
        f"{name}: {method} @ default layer: {want['predicted']}" for method in methods
    ]
    for method, pane in zip(methods, overlays):
        decoded = decode_map(pane["image"])
        direct = want["maps"][method]
        assert decoded.shape == direct.shape, (decoded.shape, direct.shape)
        error = float(np.abs(decoded - direct).max())
        assert error <= MAP_TOLERANCE, f"{name} {method}: map differs by {error:.4f}"


class RssSampler(threading.Thread):
    """The server's RSS (process and children) every ``SAMPLE_EVERY_S``; ``peak`` since start."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def now(self) -> int:
        import psutil

        total = 0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak = max(self.peak, total)
        return total

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_EVERY_S):
            self.now()


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    checked: int = 0
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss: int = 0

    def summary(self) -> dict[str, float]:
        ms = sorted(1000 * value for value in self.latencies)
        cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
        return {
            "requests": len(ms),
            "p50_ms": cuts[49],
            "p90_ms": cuts[89],
            "p99_ms": cuts[98],
            "mean_ms": statistics.fmean(ms),
            "requests_per_s": len(ms) / self.wall_s,
            "peak_rss_mb": self.peak_rss / 2**20,
            "checked": self.checked,
        }


def run_phase(clients: list[Any], first: int, per_user: int, expected: dict, sampler: RssSampler) -> Phase:
    """Each client sends ``per_user`` requests, request numbers from ``first`` (which picks the
    image and methods), all clients at once; every answer checked."""
    from gradio_client import handle_file

    names = sorted(expected["images"])
    phase = Phase()
    lock = threading.Lock()
    sampler.peak = sampler.now()

    def user(index: int, client: Any) -> None:
        for number in range(first, first + per_user):
            name = names[(index + number) % len(names)]
            methods = METHOD_MIX[(3 * index + number) % len(METHOD_MIX)]
            start = time.perf_counter()
            try:
                overlays, answers = client.predict(
                    images=[handle_file(expected["images"][name])],
                    methods=list(methods),
                    opacity=1.0,
                    colormap=COLORMAP,
                    api_name="/explain",
                )
                elapsed = time.perf_counter() - start
                check(name, methods, overlays, answers, expected)
                problem = None
            except Exception as error:  # noqa: BLE001 - every failure is reported at the end
                elapsed, problem = time.perf_counter() - start, f"user {index} request {number} ({name}): {error!r}"
            with lock:
                phase.latencies.append(elapsed)
                if problem is None:
                    phase.checked += 1
                else:
                    phase.failures.append(problem)

    threads = [threading.Thread(target=user, args=(i, client)) for i, client in enumerate(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - start
    phase.peak_rss = max(sampler.peak, sampler.now())
    return phase


def settled_rss(sampler: RssSampler) -> int:
    time.sleep(1.0)
    return sampler.now()


def test_serve_under_load(benchmark, request, server, expected):
    import gradio
    import gradio_client

    url, pid = server
    size = FULL if full_size(request.config) else SMALL
    result: dict[str, Any] = {}

    def run() -> None:
        sampler = RssSampler(pid)
        sampler.start()
        try:
            clients = [gradio_client.Client(url, verbose=False) for _ in range(size.users)]
            warm = run_phase(clients[:1], -1, 1, expected, sampler)  # first-call set-up, not measured
            assert not warm.failures, warm.failures
            load = run_phase(clients, 0, size.load_requests, expected, sampler)
            rss_after_load = settled_rss(sampler)
            per_user = (size.soak_total - size.users * size.load_requests) // size.users
            soak = run_phase(clients, size.load_requests, per_user, expected, sampler)
            rss_after_all = settled_rss(sampler)
        finally:
            sampler.stopped.set()
        result.update(
            load=load,
            soak=soak,
            rss_after_load=rss_after_load,
            rss_after_all=rss_after_all,
            peak_rss=sampler.peak,
            total=len(load.latencies) + len(soak.latencies),
        )

    benchmark.group = "serve"
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    load, soak = result["load"], result["soak"]
    ratio = result["rss_after_all"] / result["rss_after_load"]
    summary = {
        "users": size.users,
        "load_requests_per_user": size.load_requests,
        "total_requests": result["total"],
        "load": load.summary(),
        "soak": soak.summary(),
        "rss_after_load_mb": result["rss_after_load"] / 2**20,
        "rss_after_all_mb": result["rss_after_all"] / 2**20,
        "peak_rss_mb": result["peak_rss"] / 2**20,
        "rss_ratio": ratio,
        "gradio": gradio.__version__,
        "gradio_client": gradio_client.__version__,
    }
    failures = load.failures + soak.failures
    summary["failures"] = failures[:20]
    summary["failed"] = len(failures)
    benchmark.extra_info["serve"] = summary  # no "case" key: benchmarks/report.py's tables skip it
    print(section(summary, size))
    for failure in failures:
        print("wrong answer:", failure)
    if request.config.getoption("write_results") and full_size(request.config):
        path = Path(request.config.getoption("results_path"))
        request.config.add_cleanup(lambda: write_section(path, section(summary, size)))  # after report.py's rewrite
    problems = []
    if failures:
        problems.append(f"{len(failures)} of {result['total']} answers wrong, e.g. {failures[:3]}")
    if size.assert_rss and ratio > RSS_GROWTH:
        problems.append(
            f"RSS grew {ratio:.3f}x from request {size.users * size.load_requests} to {result['total']} "
            f"({summary['rss_after_load_mb']:.1f} -> {summary['rss_after_all_mb']:.1f} MB)"
        )
    assert not problems, "; ".join(problems)
    assert load.checked + soak.checked == result["total"]


def machine() -> str:
    from benchmarks.report import cpu_name

    return f"{os.cpu_count()}-core {cpu_name()}; torch {torch.__version__}"


def section(summary: dict[str, Any], size: Size) -> str:
    load, soak = summary["load"], summary["soak"]
    first, total = load["requests"], summary["total_requests"]
    rows = [
        ("load", f"{summary['users']} x {summary['load_requests_per_user']}", load),
        ("soak (after the load)", f"{summary['users']} x {soak['requests'] // summary['users']}", soak),
    ]
    lines = [
        SECTION,
        "",
        f"Written by `pytest benchmarks/bench_serve.py --benchmark-only --write-results` on {datetime.date.today()}.",
        f"Machine: {machine()}; gradio {summary['gradio']}, gradio_client {summary['gradio_client']}.",
        "",
        "`explainkit serve --device cpu` in its own process (random-init ResNet18-CIFAR checkpoint); each",
        "user a thread with its own `gradio_client.Client` calling `/explain` back to back: one image",
        "(4 distinct PNGs, 24x24 to 40x48), gradcam, gradcam++ or both. Every answer is checked against",
        "the library called directly: predicted class, top-5 probabilities (1e-5) and each map, decoded",
        "from its opacity-1 viridis overlay (within 3/256). Server RSS: psutil every 0.2 s.",
        "",
        "| phase | users x requests | p50 ms | p90 ms | p99 ms | requests/s | peak RSS (MB) | answers checked |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase, shape, stats in rows:
        lines.append(
            f"| {phase} | {shape} | {stats['p50_ms']:.0f} | {stats['p90_ms']:.0f} | {stats['p99_ms']:.0f} | "
            f"{stats['requests_per_s']:.1f} | {stats['peak_rss_mb']:.0f} | {stats['checked']}/{stats['requests']} |"
        )
    met = "yes" if summary["rss_ratio"] <= RSS_GROWTH else "no"
    lines += [
        "",
        f"Soak: server RSS {summary['rss_after_load_mb']:.1f} MB after request {first}, "
        f"{summary['rss_after_all_mb']:.1f} MB after request {total}: {summary['rss_ratio']:.3f}x "
        f"(target <= {RSS_GROWTH:.2f}x{', asserted' if size.assert_rss else ''}: {met}). "
        f"Peak RSS over the run: {summary['peak_rss_mb']:.1f} MB.",
    ]
    if summary["failed"]:
        empty = sum("cannot identify image file" in failure for failure in summary["failures"])
        lines += [
            "",
            f"Wrong answers: {summary['failed']} of {total} (of the first {len(summary['failures'])} listed, "
            f"{empty} an overlay file the client could not read as an image).",
        ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this module's section of ``path`` (up to the next ``## `` heading), or append it."""
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text if old else text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    path.write_text(new)
