"""Grad-CAM at the default layer of every torchvision classifier and of timm's families.

Each model is built with random weights (no download), its BatchNorm statistics calibrated on a
few random batches (a library's tiny initial weights otherwise shrink activations to ~1e-12 and
every map to zero, which says nothing about the layer), the last Linear re-drawn (libraries
zero-initialise heads; a trained head is not zero) and then explained at its default layer for
every class. A row passes when the maps are finite and of the input size, each image has a map
that varies over it (on random weights one class's Grad-CAM may be all negative, hence all zero
after the ReLU, as pytorch-grad-cam's is too; a layer the gradient cannot reach is flat for every
class), and the default is the layer ``explainkit layers`` marks.

``python -m benchmarks.zoo_sweep`` writes ``docs/supported-models.md`` from the sweep;
``tests/test_zoo_sweep.py`` runs the same sweep and fails when the page no longer matches.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from explainkit.explainers.gradient import GradCAM
from explainkit.models.layers import default_layer_and_reason, dry_input_size, layer_table, trace_layers

PAGE = Path(__file__).resolve().parents[1] / "docs" / "supported-models.md"
MAX_PARAMETERS = 140e6  # the sweep's size limit (random weights, batch of 2, CPU): every VGG, not the largest RegNet/ViTs
SLOW_PARAMETERS = 50e6  # marked slow in the test suite (still run by CI)
FLAT = 1e-3  # a map whose per-image standard deviation is below this (maps are in [0, 1]) is flat

# timm families: CNNs; ViTs with class, distillation and register tokens; hierarchical and hybrid
# convolution/attention models. The smallest variant of each.
TIMM_FAMILIES = {
    "cnn": (
        "resnet18", "resnest14d", "cspresnet50", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small",
        "convnext_atto", "regnetx_002", "nf_regnet_b0", "densenet121", "dla34", "hrnet_w18_small", "inception_v3",
        "rexnet_100", "repvgg_a0", "mobileone_s0", "ghostnet_100", "hgnetv2_b0", "lcnet_050", "starnet_s050",
        "inception_next_atto", "mambaout_femto",
    ),
    "vit": (
        "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_wee_patch16_reg1_gap_256",
        "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224", "beit_base_patch16_224",
        "crossvit_tiny_240", "tnt_s_patch16_224", "volo_d1_224", "vit_small_r26_s32_224",
    ),
    "hierarchical": (
        "swin_tiny_patch4_window7_224", "pvt_v2_b0", "davit_tiny", "focalnet_tiny_srf", "gcvit_xxtiny",
        "poolformer_s12", "caformer_s18", "hiera_tiny_224", "mvitv2_tiny",
    ),
    "hybrid": (
        "coatnet_0_rw_224", "maxvit_pico_rw_256", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8",
        "mobilevit_s", "mobilevitv2_050", "levit_128", "nextvit_small", "efficientvit_b0", "efficientvit_m0",
        "edgenext_xx_small", "tiny_vit_5m_224", "repvit_m0_9", "mobilenetv4_hybrid_medium", "coat_lite_tiny",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ZooModel:
    library: str  # "torchvision" or "timm"
    name: str
    family: str

    @property
    def spec(self) -> str:
        return f"{self.library}:{self.name}"


@dataclass(frozen=True)
class ZooResult:
    model: ZooModel
    parameters: float
    input_size: tuple[int, int, int]
    layer: str
    reading: str
    reason: str
    marked: str  # the layer `explainkit layers` marks as default
    finite: bool
    shape_ok: bool
    spread: tuple[float, ...]  # per image, the largest standard deviation over the classes' maps

    @property
    def passed(self) -> bool:
        return self.finite and self.shape_ok and min(self.spread) > FLAT and self.marked == self.layer

    def row(self) -> str:
        reading = self.reading.replace("|", "/")
        return f"| `{self.model.spec}` | {self.model.family} | `{self.layer}` | {reading} | {self.reason} |"


def torchvision_models() -> list[ZooModel]:
    import torchvision

    return [ZooModel("torchvision", name, "torchvision") for name in torchvision.models.list_models(module=torchvision.models)]


def timm_models() -> list[ZooModel]:
    return [ZooModel("timm", name, family) for family, names in TIMM_FAMILIES.items() for name in names]


def build(model: ZooModel) -> nn.Module:
    """The model with random weights and 10 classes, BatchNorm calibrated, head re-drawn, in eval mode."""
    torch.manual_seed(0)
    network = build_uncalibrated(model)
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:  # only the norms train: auxiliary heads (Inception) stay off
        network.eval()
        for norm in norms:
            norm.train()
        with torch.no_grad():
            for _ in range(2):
                network(torch.randn(4, *dry_input_size(network)))
    for head in [m for m in network.modules() if isinstance(m, nn.Linear)][-1:]:
        nn.init.normal_(head.weight, std=0.5)
    return network.eval()


def parameter_count(model: ZooModel) -> float:
    """Parameters without building the weights (meta device), to skip models over the limit cheaply."""
    try:
        with torch.device("meta"):
            network = build_uncalibrated(model)
    except (NotImplementedError, RuntimeError):  # an initialiser that copies data: build it for real
        network = build_uncalibrated(model)
    return float(sum(p.numel() for p in network.parameters()))


def build_uncalibrated(model: ZooModel) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model.library == "torchvision":
            import torchvision

            return torchvision.models.get_model(model.name, weights=None, num_classes=10)
        import timm

        return timm.create_model(model.name, pretrained=False, num_classes=10)


def sweep_one(model: ZooModel) -> ZooResult:
    network = build(model)
    size = dry_input_size(network)
    layer, reason = default_layer_and_reason(network)
    marked = next((row["name"] for row in layer_table(network, size) if row["default"]), "")
    torch.manual_seed(1)
    images = torch.randn(2, *size)
    explainer = GradCAM(network)
    maps = explainer(images, targets="all")  # (2, 10, H, W), one batched backward
    return ZooResult(
        model=model,
        parameters=float(sum(p.numel() for p in network.parameters())),
        input_size=size,
        layer=explainer.layer_name,
        reading=trace_layers(network).reading(network, layer) or "?",
        reason=reason,
        marked=marked,
        finite=bool(torch.isfinite(maps).all()),
        shape_ok=tuple(maps.shape) == (2, 10, size[1], size[2]),
        spread=tuple(maps.flatten(2).float().std(2).amax(1).tolist()),
    )


def page(results: list[ZooResult]) -> str:
    """The supported-models page: one row per model of the sweep."""
    lines = [
        "# Supported models",
        "",
        "<!-- generated by `python -m benchmarks.zoo_sweep`; tests/test_zoo_sweep.py fails when it drifts -->",
        "",
        "Every model below was built with random weights, explained with Grad-CAM at its default layer and gave",
        "finite maps of the input size that vary over the image; the default is the layer `explainkit layers`",
        f"marks. torchvision: every classifier up to {MAX_PARAMETERS / 1e6:.0f}M parameters; timm: the smallest variant",
        "of each family listed. The default layer is chosen from one dry forward of the model",
        "(`explainkit.models.layers`): a layer measured for the model card, the last block's first norm of a plain",
        "vision transformer, the last stage timm declares in `feature_info`, a last stage by its conventional",
        "name, else the last module whose output is a feature map. `--layer` picks another. A model where",
        "no rule finds a feature map is a one-line `LayerNotFoundError` asking for `--layer`, never a guess.",
        "",
        "Reading: how the layer's output becomes a map: `nchw` as is, `nhwc` channels-last, `tokens: P prefix",
        "+ HxW grid` a token sequence whose P prefix tokens (class, distillation, register) are dropped.",
        "",
        "| model | family | default layer | reading | why |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [result.row() for result in results]
    return "\n".join(lines) + "\n"


def sweep(models: list[ZooModel], progress: bool = True) -> list[ZooResult]:
    from tqdm import tqdm

    results = []
    for model in tqdm(models, desc="zoo", disable=not progress):
        if parameter_count(model) > MAX_PARAMETERS:
            continue
        results.append(sweep_one(model))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE, help=f"the page to write (default: {PAGE})")
    args = parser.parse_args(argv)
    results = sweep(torchvision_models() + timm_models())
    failed = [r for r in results if not r.passed]
    for result in failed:
        print(f"FAILED {result.model.spec}: {result}")
    args.out.write_text(page(results))
    print(f"wrote {args.out}: {len(results)} models, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
