"""A detectron2-style Faster R-CNN / Mask R-CNN R50-FPN from torchvision's detection models, with
random weights calibrated so the detector does the work a trained one does.

Test-time settings are detectron2's `faster_rcnn_R_50_FPN_1x` ones: short side resized to 800
(max 1333), 1000 proposals per FPN level before NMS and 1000 per image after, NMS 0.7 in the
RPN and 0.5 per class in the box head, at most 100 detections, frozen batch norm in the
backbone. torchvision's heads stay as they are (MultiScaleRoIAlign samples 2x2 per bin, where
detectron2 adapts the sampling to the box size).

Random weights make a detector degenerate, so `calibrate` fixes three things on one seeded
calibration image (not an image that is timed):
1. Frozen batch norm: each layer's statistics are set to the statistics of its input, in one pass
   in network order, so every layer normalises its input (unnormalised activations grow layer
   after layer and the RPN sees garbage).
2. Objectness: the RPN head is shared by all FPN levels and its random logits differ in scale per
   level, so one level would supply all proposals. A per-level affine map, fitted so each level's
   pre-NMS top-k logits have mean 0 and deviation 1, lets proposals come from every level, i.e.
   in all sizes, as with a trained RPN.
3. Box head: the classifier's logits are scaled to a deviation of 2 (a random head's softmax is
   nearly uniform) and the score threshold is set so about 1000 (box, class) candidates per
   image reach the final NMS, as with detectron2's 0.05 threshold on a trained model.
`workload` reports what the model did on an input (proposals, RoIs per level, candidates,
detections), so anyone can check that the RoI heads do full work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

CANDIDATES_PER_IMAGE = 1000  # (box, class) pairs that reach the final NMS, per image
CLASS_LOGIT_STD = 2.0


class LevelCalibratedRPNHead(nn.Module):
    """torchvision's RPNHead followed by a fixed affine map of the objectness logits per level."""

    def __init__(self, head: nn.Module, levels: int) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("scale", torch.ones(levels))
        self.register_buffer("shift", torch.zeros(levels))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = self.head(features)
        logits = [t * self.scale[i] + self.shift[i] for i, t in enumerate(logits)]
        return logits, deltas


def build_model(kind: str = "faster_rcnn", seed: int = 0) -> nn.Module:
    """Faster R-CNN (or Mask R-CNN) R50-FPN, 91 COCO classes, random weights (uncalibrated)."""
    if kind not in ("faster_rcnn", "mask_rcnn"):
        raise ValueError(f"kind must be 'faster_rcnn' or 'mask_rcnn', got {kind!r}")
    torch.manual_seed(seed)
    # trainable_layers=0 as in inference: every parameter frozen; FrozenBatchNorm2d as detectron2.
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), trainable_layers=0)
    settings = dict(
        min_size=800,
        max_size=1333,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        rpn_nms_thresh=0.7,
        box_nms_thresh=0.5,
        box_detections_per_img=100,
    )
    model = (FasterRCNN if kind == "faster_rcnn" else MaskRCNN)(backbone, num_classes=91, **settings)
    model.rpn.head = LevelCalibratedRPNHead(model.rpn.head, levels=5)
    return model.eval()


def synthetic_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A seeded RGB scene in [0, 1]: a smooth background, 24 filled rectangles and ellipses of
    random colours and sizes (edges and regions for the detector to respond to), mild noise."""
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(1, 3, 6, 9, generator=g), size=(height, width), mode="bicubic")[0]
    ys = torch.arange(height).view(-1, 1).float()
    xs = torch.arange(width).view(1, -1).float()
    for _ in range(24):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([height, width])).tolist()
        hh, hw = (torch.exp(torch.empty(2).uniform_(math.log(12), math.log(height / 3), generator=g))).tolist()
        if torch.rand(1, generator=g).item() < 0.5:
            mask = ((ys - cy).abs() < hh) & ((xs - cx).abs() < hw)
        else:
            mask = ((ys - cy) / hh) ** 2 + ((xs - cx) / hw) ** 2 < 1
        img[:, mask] = torch.rand(3, 1, generator=g)
    img += 0.03 * torch.randn(img.shape, generator=g)
    return img.clamp_(0, 1)


def _set_stats_to_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    x = inputs[0].float()
    module.running_mean.copy_(x.mean((0, 2, 3)))
    module.running_var.copy_(x.var((0, 2, 3), unbiased=False))


# The three calibration steps, shared with the detectron2 backend (d2.py); each takes the
# backend's pieces, so only the wiring differs between the two.


def normalise_frozen_batch_norms(backbone: nn.Module, run: Callable[[], object]) -> object:
    """Step 1: `run` (a forward of the backbone) with a pre-hook on every frozen batch norm
    (torchvision's or detectron2's class) that sets its statistics to those of its input, just
    before it normalises: in network order, so each layer sees already calibrated inputs."""
    hooks = [
        m.register_forward_pre_hook(_set_stats_to_input)
        for m in backbone.modules()
        if type(m).__name__ == "FrozenBatchNorm2d"
    ]
    try:
        return run()
    finally:
        for h in hooks:
            h.remove()


def standardise_objectness(head: LevelCalibratedRPNHead, features: list[torch.Tensor], k: int) -> None:
    """Step 2: per-level affine so each level's pre-NMS top-k objectness logits have mean 0, std 1."""
    head.scale.fill_(1.0)
    head.shift.fill_(0.0)
    logits, _ = head(features)
    for i, t in enumerate(logits):
        top = t.flatten().topk(min(k, t.numel())).values
        std = top.std().clamp_min(1e-12)
        head.scale[i] = 1.0 / std
        head.shift[i] = -top.mean() / std


def calibrate_classifier(predictor: nn.Module, run: Callable[[], object], background: int) -> float:
    """Step 3: scales the classifier (`predictor.cls_score`) to logits of deviation
    CLASS_LOGIT_STD, and returns the score threshold above which CANDIDATES_PER_IMAGE (box, class)
    pairs lie on the calibration image. `run` runs the model with nothing passing its threshold;
    `background` is the background column (0 in torchvision, -1 in detectron2)."""
    captured: list[torch.Tensor] = []
    handle = predictor.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        run()
        factor = CLASS_LOGIT_STD / captured[0].std()
        predictor.cls_score.weight.mul_(factor)
        predictor.cls_score.bias.mul_(factor)
        captured.clear()
        run()
    finally:
        handle.remove()
    probs = F.softmax(captured[0], -1)
    keep = torch.ones(probs.shape[1], dtype=torch.bool)
    keep[background] = False
    scores = probs[:, keep].flatten()
    return scores.topk(min(CANDIDATES_PER_IMAGE, scores.numel())).values[-1].item()


@torch.no_grad()
def calibrate(model: nn.Module, image: torch.Tensor) -> dict:
    """Calibrates a `build_model` model on `image` (see the module docstring); returns what it set."""
    model.eval()
    images, _ = model.transform([image])
    features = normalise_frozen_batch_norms(model.backbone, lambda: model.backbone(images.tensors))
    head: LevelCalibratedRPNHead = model.rpn.head
    standardise_objectness(head, list(features.values()), model.rpn._pre_nms_top_n["testing"])
    model.roi_heads.score_thresh = 1.0  # nothing reaches the final NMS while calibrating
    thresh = calibrate_classifier(model.roi_heads.box_predictor, lambda: model([image]), background=0)
    model.roi_heads.score_thresh = thresh
    return {"rpn_logit_scale": head.scale.tolist(), "rpn_logit_shift": head.shift.tolist(), "box_score_thresh": thresh}


@dataclass
class Workload:
    proposals: list[int] = field(default_factory=list)  # RPN output, per image
    rois_per_level: dict[str, int] = field(default_factory=dict)  # box head RoIs, per FPN level
    candidates: list[int] = field(default_factory=list)  # (box, class) pairs into the final NMS, per image
    detections: list[int] = field(default_factory=list)  # per image

    def line(self) -> str:
        levels = ", ".join(f"{k}: {v}" for k, v in self.rois_per_level.items())
        return (
            f"proposals per image {self.proposals}; box-head RoIs per level {{{levels}}}; "
            f"candidates into the final NMS {self.candidates}; detections {self.detections}"
        )


@contextmanager
def _recording(model: nn.Module, work: Workload) -> Iterator[None]:
    roi_heads = model.roi_heads
    pool = roi_heads.box_roi_pool

    def on_rpn(module, inputs, output):
        work.proposals = [len(b) for b in output[0]]

    def on_pool(module, inputs, output):
        boxes = inputs[1]
        levels = module.map_levels(boxes)
        for i in range(len(module.featmap_names)):
            work.rois_per_level[f"P{int(math.log2(1 / module.scales[i]))}"] = int((levels == i).sum())

    def on_predictor(module, inputs, output):
        scores = F.softmax(output[0].float(), -1)[:, 1:]
        # The same filter as postprocess_detections (score threshold; tiny boxes are not counted).
        above = (scores > roi_heads.score_thresh).sum(1)
        work.candidates = [int(c.sum()) for c in above.split(work.proposals)]

    hooks = [
        model.rpn.register_forward_hook(on_rpn),
        pool.register_forward_hook(on_pool),
        roi_heads.box_predictor.register_forward_hook(on_predictor),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def workload(model: nn.Module, images: list[torch.Tensor]) -> tuple[Workload, list[dict]]:
    """Runs the model once on `images` and reports what it did, with its detections."""
    work = Workload()
    with torch.inference_mode(), _recording(model, work):
        out = model(images)
    work.detections = [len(o["boxes"]) for o in out]
    return work, out
