"""Hypothesis properties of the explainer API, for every built-in method.

Drawn: batch sizes, image sizes (tiny, odd, non-square), input dtypes, memory formats, the devices
present, targets (ints, sequences, tensors, ``"all"``, top-k, class sets, target objects, plain
callables) and layers of a tiny CNN (a block, a conv, a BatchNorm, an in-place ReLU).

Invariants: the maps' shape, dtype and device, values in [0, 1] and finite; the model left exactly
as found (modes, parameters, buffers, ``requires_grad``, ``.grad``, hooks); the same input twice
gives the same maps; a batch's maps are each image's maps alone; non-finite input is an
:class:`~explainkit.errors.ExplainkitError` naming exactly those images; a finite input never
yields a non-finite map; an input of another dtype than the model's is cast to it.

Example counts are bounded (``derandomize=True``, so CI sees the same examples every run).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import explainkit  # noqa: E402
from explainkit.errors import ExplainkitError  # noqa: E402
from explainkit.plugins import BUILTIN_NAME  # noqa: E402
from explainkit.registry import registrations  # noqa: E402
from explainkit.targets import ClassDifference, ClassScores, MultiLabel  # noqa: E402
from tests.test_base import _hooks  # noqa: E402

# Every built-in, read off the registry (plugins such as the gradcam_zoo's pgc-* are not ours).
# Attention methods need a vision transformer (tests/test_attention.py, tests/test_legrad.py).
BUILTINS = sorted(r.name for r in registrations().values() if r.plugin == BUILTIN_NAME and r.family != "attention")
# Finer-CAM explains a class against its look-alikes: class targets only (others are its one-line error).
CLASS_ONLY = {"finercam"}
FUSION = {r.name for r in registrations().values() if r.plugin == BUILTIN_NAME and r.family == "fusion"}
CLASS_KINDS = {"none", "int", "list", "tensor", "all", "topk", "topk-tuple", "sets", "scores", "difference"}
FAST = {"opticam": {"iterations": 2, "progress": False}}  # its own tests check the default schedule
CLASSES = 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# A block, a conv, BatchNorms (stem.1 is followed by an in-place ReLU, which must not reach its
# captured output), an in-place ReLU, the default (None); a module object instead of a path is
# drawn too. At most 8 channels: Score-CAM and Ablation-CAM run one forward per channel.
LAYERS = [None, "features", "features.0", "features.1", "stem.1", "stem.2", "stem"]
FLOATS = (torch.float32, torch.float64)
HALVES = (torch.float16, torch.bfloat16)

# The autouse seeding fixture of conftest is function-scoped and harmless across examples.
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
ATOL = 1e-4  # maps are in [0, 1]: float noise of batched against single-image kernels


def _tiny_cnn(inplace: bool = True) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace)),
            features=nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8, CLASSES),
        )
    )
    model.train()
    with torch.no_grad():  # running statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12) * 2 + 0.5)
    return model.eval()


@functools.cache
def _model(device: str, dtype: torch.dtype, inplace: bool = True) -> nn.Module:
    return _tiny_cnn(inplace).to(device=device, dtype=dtype)


@functools.cache
def _explainer(name: str, layer: str | None, device: str, dtype: torch.dtype, as_module: bool = False, inplace: bool = True):
    model = _model(device, dtype, inplace)
    return explainkit.get_explainer(name, model, layer=_layer_for(name, model, layer, as_module), **FAST.get(name, {}))


def _layer_for(name: str, model: nn.Module, layer: str | None, as_module: bool) -> Any:
    """The drawn layer as a path or a module; for a fusion method at a stem layer, which nothing
    of larger resolution precedes (a one-line error, tests/test_fusion.py), that layer and the
    feature stage, fused explicitly."""
    chosen: Any = model.get_submodule(layer) if as_module and layer is not None else layer
    if name in FUSION and layer is not None and layer.startswith("stem"):
        chosen = [chosen, model.features if as_module else "features"]
    return chosen


# --- targets ---------------------------------------------------------------------------------


@dataclass
class Case:
    """A target form: ``build(rows)`` is the target for the images ``rows`` of the batch (per-image
    forms pick those images' entries), ``columns`` the maps per image (``None``: ``(N, H, W)``)."""

    label: str
    build: Callable[[list[int]], Any]
    columns: int | None

    def __repr__(self) -> str:
        return self.label


def _difference(out: torch.Tensor) -> torch.Tensor:
    return out[:, 0] - out[:, 1]


def _two_scores(out: torch.Tensor) -> torch.Tensor:
    return out[:, 2:4]


@st.composite
def target_cases(draw, n: int, classes_only: bool = False) -> Case:
    classes = st.integers(0, CLASSES - 1)
    kind = draw(
        st.sampled_from(
            [
                k
                for k in [
                    "none",
                    "int",
                    "list",
                    "tensor",
                    "all",
                    "topk",
                    "topk-tuple",
                    "sets",
                    "scores",
                    "difference",
                    "multilabel",
                    "callable",
                    "callable-j",
                ]
                if not classes_only or k in CLASS_KINDS
            ]
        )  # fmt: skip
    )
    if kind == "none":
        return Case("None", lambda rows: None, None)
    if kind == "int":
        k = draw(classes)
        return Case(f"{k}", lambda rows: k, None)
    if kind in ("list", "tensor"):
        per_image = draw(st.lists(classes, min_size=n, max_size=n))
        if kind == "list":
            return Case(f"{per_image}", lambda rows: [per_image[r] for r in rows], None)
        return Case(f"tensor({per_image})", lambda rows: torch.tensor([per_image[r] for r in rows]), None)
    if kind == "all":
        return Case("'all'", lambda rows: "all", CLASSES)
    if kind in ("topk", "topk-tuple"):
        k = draw(st.integers(1, CLASSES))
        return Case(f"'topk:{k}'", lambda rows: f"topk:{k}" if kind == "topk" else ("topk", k), k)
    if kind == "sets":
        j = draw(st.integers(1, 3))
        sets = draw(st.lists(st.lists(classes, min_size=j, max_size=j), min_size=n, max_size=n))
        return Case(f"tensor({sets})", lambda rows: torch.tensor([sets[r] for r in rows]), j)
    if kind == "scores":
        k = draw(classes)
        return Case(f"ClassScores({k})", lambda rows: ClassScores(k), None)
    if kind == "difference":
        comparisons = draw(st.integers(1, CLASSES - 1))
        return Case(f"ClassDifference(comparisons={comparisons})", lambda rows: ClassDifference(comparisons=comparisons), None)
    if kind == "multilabel":
        labels = draw(st.lists(classes, min_size=1, max_size=3, unique=True))
        return Case(f"MultiLabel(labels={labels})", lambda rows: MultiLabel(labels=labels), len(labels))
    if kind == "callable":
        return Case("out[:, 0] - out[:, 1]", lambda rows: _difference, None)
    return Case("out[:, 2:4]", lambda rows: _two_scores, 2)


# --- inputs ----------------------------------------------------------------------------------


@dataclass
class Setup:
    n: int
    size: tuple[int, int]
    device: str
    model_dtype: torch.dtype
    input_dtype: torch.dtype
    channels_last: bool
    layer: str | None
    as_module: bool
    seed: int

    def images(self, scale: float = 1.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        images = (torch.randn(self.n, 3, *self.size, generator=generator, dtype=torch.float64) * scale).to(self.input_dtype)
        images = images.to(self.device)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


@st.composite
def setups(draw, max_batch: int = 4, input_dtypes: tuple = (*FLOATS, torch.float16), model_dtypes: tuple = FLOATS) -> Setup:
    layer = draw(st.sampled_from(LAYERS))
    return Setup(
        n=draw(st.integers(1, max_batch)),
        size=(draw(st.integers(8, 40)), draw(st.integers(8, 40))),
        device=draw(st.sampled_from(DEVICES)),
        model_dtype=draw(st.sampled_from(model_dtypes)),
        input_dtype=draw(st.sampled_from(input_dtypes)),
        channels_last=draw(st.booleans()),
        layer=layer,
        as_module=layer is not None and draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _explainer_for(name: str, setup: Setup):
    return _explainer(name, setup.layer, setup.device, setup.model_dtype, setup.as_module)


def _expected_shape(setup: Setup, case: Case) -> tuple[int, ...]:
    columns = () if case.columns is None else (case.columns,)
    return (setup.n, *columns, *setup.size)


def _assert_valid_maps(maps: torch.Tensor, shape: tuple[int, ...], device: str) -> None:
    assert maps.shape == shape
    assert maps.dtype == torch.float32 and maps.device.type == device
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


# --- properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data(), setup=setups(model_dtypes=FLOATS + HALVES))
def test_maps_have_the_shape_range_and_are_repeatable(name, data, setup):
    case = data.draw(target_cases(setup.n, classes_only=name in CLASS_ONLY), label="target")
    explainer = _explainer_for(name, setup)
    images = setup.images()
    rows = list(range(setup.n))
    first = explainer.explain(images, case.build(rows))
    _assert_valid_maps(first.maps, _expected_shape(setup, case), setup.device)
    if first.logits is not None:
        assert first.logits.shape == (setup.n, CLASSES)
    assert first.scores is not None and first.scores.shape[0] == setup.n
    again = explainer(images, case.build(rows))
    torch.testing.assert_close(again, first.maps, atol=0, rtol=0)  # the same input: the same maps


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data(), setup=setups(max_batch=4))
def test_a_batchs_maps_are_each_images_maps_alone(name, data, setup):
    case = data.draw(target_cases(setup.n, classes_only=name in CLASS_ONLY), label="target")
    explainer = _explainer_for(name, setup)
    images = setup.images()
    batch = explainer(images, case.build(list(range(setup.n))))
    for i in range(setup.n):
        alone = explainer(images[i : i + 1], case.build([i]))
        torch.testing.assert_close(batch[i : i + 1], alone, atol=ATOL, rtol=0, msg=lambda m, i=i: f"image {i}: {m}")


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "hooks": _hooks(model),
    }


def _assert_same_state(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for kind in ("parameters", "buffers", "grads"):
        assert after[kind].keys() == before[kind].keys()
        for key, value in before[kind].items():
            if value is None:
                assert after[kind][key] is None, f"{kind} {key}"
            else:  # exactly: not a BatchNorm update, not an accumulated gradient
                assert torch.equal(after[kind][key], value), f"{kind} {key}"


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=8, **SETTINGS)
@given(
    data=st.data(),
    setup=setups(max_batch=3),
    training=st.sampled_from(["train", "eval", "mixed"]),
    frozen=st.sets(st.sampled_from(["stem.0.weight", "features.0.weight", "fc.weight", "fc.bias"])),
    with_grads=st.sets(st.sampled_from(["stem.0.weight", "features.1.bias", "fc.weight"])),
    user_hook=st.booleans(),
)
def test_the_model_is_left_exactly_as_found(name, data, setup, training, frozen, with_grads, user_hook):
    case = data.draw(target_cases(setup.n, classes_only=name in CLASS_ONLY), label="target")
    model = copy.deepcopy(_model(setup.device, setup.model_dtype))
    if training != "eval":
        model.train()
    if training == "mixed":
        model.features.eval()
    parameters = dict(model.named_parameters())
    for key in frozen:
        parameters[key].requires_grad_(False)
    for key in with_grads:
        parameters[key].grad = torch.full_like(parameters[key], 0.25)
    seen: list[int] = []
    if user_hook:  # a user's hook stays, and still runs
        model.fc.register_forward_hook(lambda module, inputs, output: seen.append(len(output)))
    explainer = explainkit.get_explainer(
        name, model, layer=_layer_for(name, model, setup.layer, setup.as_module), **FAST.get(name, {})
    )
    before = _state(model)
    maps = explainer(setup.images(), case.build(list(range(setup.n))))
    _assert_valid_maps(maps, _expected_shape(setup, case), setup.device)
    _assert_same_state(_state(model), before)
    if user_hook:
        seen.clear()
        model(torch.zeros(2, 3, 8, 8, device=setup.device, dtype=setup.model_dtype))
        assert seen == [2]


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data(), setup=setups(max_batch=6), poison=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_images_are_an_error_naming_them(name, data, setup, poison):
    images = setup.images().clone()
    bad = data.draw(st.sets(st.integers(0, setup.n - 1), min_size=1), label="bad images")
    for i in sorted(bad):
        c = data.draw(st.integers(0, 2), label="channel")
        y, x = data.draw(st.integers(0, setup.size[0] - 1)), data.draw(st.integers(0, setup.size[1] - 1))
        images[i, c, y, x] = poison
    shown = ", ".join(map(str, sorted(bad)))
    model = _model(setup.device, setup.model_dtype)
    before = _state(model)
    with pytest.raises(ExplainkitError, match=rf"^images {shown} \(0-based\) contain NaN or Inf"):
        _explainer_for(name, setup)(images)
    _assert_same_state(_state(model), before)


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=10, **SETTINGS)
@given(
    data=st.data(),
    setup=setups(max_batch=3, input_dtypes=(torch.float32, torch.float64)),
    scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 255.0, 1e4, 1e8]),
    constant=st.booleans(),
)
def test_a_finite_input_never_yields_a_non_finite_map(name, data, setup, scale, constant):
    case = data.draw(target_cases(setup.n, classes_only=name in CLASS_ONLY), label="target")
    images = setup.images(scale)
    if constant:  # flat images: zero activations, zero gradients, constant maps
        images = torch.full_like(images, scale)
    maps = _explainer_for(name, setup)(images, case.build(list(range(setup.n))))
    _assert_valid_maps(maps, _expected_shape(setup, case), setup.device)


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=8, **SETTINGS)
@given(
    data=st.data(),
    setup=setups(max_batch=3, input_dtypes=FLOATS + HALVES, model_dtypes=FLOATS + HALVES),
)
def test_an_input_of_another_dtype_is_cast_to_the_models(name, data, setup):
    case = data.draw(target_cases(setup.n, classes_only=name in CLASS_ONLY), label="target")
    explainer = _explainer_for(name, setup)
    images = setup.images()
    target = case.build(list(range(setup.n)))
    maps = explainer(images, target)
    expected = explainer(images.to(setup.model_dtype), target)  # the values the cast gives
    torch.testing.assert_close(maps, expected, atol=0, rtol=0)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=6, **SETTINGS)
@given(
    data=st.data(),
    setup=setups(max_batch=4, input_dtypes=(torch.float64,), model_dtypes=(torch.float32, *HALVES)),
)
def test_finite_images_beyond_the_models_dtype_are_an_error_naming_them(name, data, setup):
    images = setup.images().clone()
    bad = data.draw(st.sets(st.integers(0, setup.n - 1), min_size=1), label="bad images")
    beyond = 2 * torch.finfo(setup.model_dtype).max  # finite in float64, Inf once cast to the model's dtype
    for i in sorted(bad):
        images[i, data.draw(st.integers(0, 2), label="channel")] *= beyond
    shown = ", ".join(map(str, sorted(bad)))
    with pytest.raises(ExplainkitError, match=rf"^images {shown} \(0-based\) overflow the model's"):
        _explainer_for(name, setup)(images)


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=6, **SETTINGS)
@given(data=st.data(), setup=setups(max_batch=3))
def test_in_place_operations_after_the_layer_do_not_change_its_maps(name, data, setup):
    """stem.1 (a BatchNorm) feeds ReLU(inplace=True): its maps are those of the out-of-place model."""
    case = data.draw(target_cases(setup.n, classes_only=name in CLASS_ONLY), label="target")
    target, images = case.build(list(range(setup.n))), setup.images()
    maps = _explainer(name, "stem.1", setup.device, setup.model_dtype, setup.as_module, True)(images, target)
    expected = _explainer(name, "stem.1", setup.device, setup.model_dtype, setup.as_module, False)(images, target)
    torch.testing.assert_close(maps, expected, atol=ATOL, rtol=0)
