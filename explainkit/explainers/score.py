"""Score-CAM: channel weights from the model's scores on activation-masked copies of the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from explainkit.explainers.perturbation import LayerPass, PerturbationCAM


class ScoreCAM(PerturbationCAM):
    r"""Score-CAM (Wang et al., CVPR Workshops 2020, https://arxiv.org/abs/1910.01279).

    Each channel's activation map ``A_c``, upsampled to the input (bilinear, corners aligned) and
    min-max scaled to ``M_c`` in [0, 1], masks the image; the channel's weight is the softmax over
    channels of the model's score for the target on that masked image:

    .. math:: w_c = \mathrm{softmax}_c\big(y^t(x \odot M_c)\big), \qquad L = \mathrm{ReLU}\Big(\sum_c w_c A_c\Big)

    (pytorch-grad-cam's formulation: raw logits, softmax over channels, ``1e-8`` in the scaling.)

    Cost: one full forward per channel per image (512 at ResNet18's ``layer4``) and no backward.
    Those masked forwards give every class's (box's, label's) score at once, so ``targets="all"`` costs about what
    one target costs (pytorch-grad-cam repeats them per target). Masked images are built and run
    in chunks of ``batch_size`` on the images' device, so memory stays bounded. Prefer it where
    gradients are unreliable (saturated or noisy); it is the slowest method here.
    """

    name = "scorecam"

    def channel_scores(self, run: LayerPass) -> torch.Tensor:
        images, activations = run.images, run.activations
        n, c = activations.shape[:2]
        scores = []
        for owners, channels in self.pair_chunks(n, c, images.device):
            masks = F.interpolate(
                activations[owners, channels][:, None], size=images.shape[-2:], mode="bilinear", align_corners=True
            )
            low = masks.amin(dim=(-2, -1), keepdim=True)
            high = masks.amax(dim=(-2, -1), keepdim=True)
            masks = (masks - low) / (high - low + 1e-8)
            with torch.inference_mode():  # no autograd bookkeeping at all for these forwards
                scores.append(run.scores(self.model((images[owners] * masks).to(images.dtype)), owners))
        return torch.cat(scores).view(n, c, -1).clone()  # a normal tensor again

    def weights_from_scores(self, scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return scores.softmax(dim=1)
