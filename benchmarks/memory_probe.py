"""Peak memory of one benchmark case, measured in a fresh process so cases do not share peaks.

    python -m benchmarks.memory_probe CASE DEVICE BATCH

CASE is ``forward`` or ``all-layer4`` (gradcam, every class at layer4). Prints the peak bytes the
case added: on CUDA ``torch.cuda.max_memory_allocated`` above the resident model and input, on
CPU the rise of the process's peak RSS (``ru_maxrss``) above its RSS before the call.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch

from benchmarks import cases
from explainkit.models import resnet18_cifar


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
        before = psutil.Process().memory_info().rss
        run()
        print(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
