from __future__ import annotations

import pytest
import torch

from explainkit.errors import ExplainkitError
from explainkit.runtime.device import select_device


def test_auto_and_cpu():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_absent_accelerator_is_an_error():
    with pytest.raises(ExplainkitError, match="CUDA is not available"):
        select_device("cuda")
