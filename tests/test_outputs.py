"""Models whose forward returns a tuple, a dict or an object with ``.logits`` explain like plain ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import explainkit
from explainkit.errors import ExplainkitError
from explainkit.models.outputs import logits_of


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, form: str) -> None:
        super().__init__()
        self.inner, self.form = inner, form

    def forward(self, x):
        logits = self.inner(x)
        return {"tuple": (logits, x.mean()), "dict": {"logits": logits}, "object": SimpleNamespace(logits=logits)}[self.form]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "captum-gradcam"])
@pytest.mark.parametrize("form", ["tuple", "dict", "object"])
def test_wrapped_outputs_give_the_plain_models_maps(random_model, images, form, method):
    plain = explainkit.get_explainer(method, random_model, layer="layer4")(images)
    wrapped = explainkit.get_explainer(method, Wrapped(random_model, form), layer="inner.layer4")(images)
    torch.testing.assert_close(wrapped, plain)


def test_an_output_without_logits_is_a_clear_error():
    assert logits_of([torch.zeros(2, 3)]).shape == (2, 3)
    for bad in ({"scores": torch.zeros(2, 3)}, torch.zeros(2, 3, 4), "text"):
        with pytest.raises(ExplainkitError, match="cannot find"):
            logits_of(bad)
