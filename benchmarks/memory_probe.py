"""Peak memory of one benchmark case, measured in a fresh process so cases do not share peaks.

    python -m benchmarks.memory_probe CASE DEVICE BATCH

CASE is ``forward`` or ``all-layer4`` (gradcam, every class at layer4). Prints the peak bytes the
case added: on CUDA ``torch.cuda.max_memory_allocated`` above the resident model and input; on
CPU (Linux) the process's RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
just before the call) above its RSS before the call. ``ru_maxrss`` is no good here: Linux keeps
it across ``exec``, so a child of a large pytest process inherits the parent's peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import cases
from explainkit.models.store import resnet18_cifar


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(case: str, device_name: str, batch: int) -> int:
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = resnet18_cifar(10).eval().to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    run = cases.forward(model, images) if case == "forward" else cases.ours("gradcam", model, images, "layer4", "all")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - before)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        run()
        print(max(0, _status_kib("VmHWM") - before) * 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
