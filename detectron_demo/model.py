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

`dcn_faster_rcnn` is the same Faster R-CNN with the res3-res5 bottlenecks' 3x3 convolutions
(`conv2` of every block of layer2, layer3, layer4) made modulated deformable convolutions (DCNv2),
as detectron2's `mask_rcnn_R_50_FPN_1x_dconv_c3-c5` (DEFORM_ON_PER_STAGE [False, True, True, True],
DEFORM_MODULATED, DEFORM_NUM_GROUPS 1): see `ModulatedDeformConv`. Its calibration sets each
offset/mask conv in step 1's pass (in network order, before the batch norm after it), per output
channel: offsets of OFFSET_STD pixels (a seeded displacement per kernel tap and axis, so every
sample is fractional and a few pixels off the grid) plus an input-dependent part of OFFSET_VARIATION
pixels (the sampling positions differ from one output position to the next), and mask logits of
mean MASK_LOGIT_MEAN, deviation MASK_LOGIT_STD (masks mostly 0.5..0.9). The input-dependent part
is small on purpose: with random weights, offsets that follow the input by pixels make the
network chaotic (a rounding difference of 1e-6 in one layer grows through the 13 layers to
different detections), which a trained detector is not, and float32 runs could not be compared.
Even so the float32 comparison has less room than with the plain models, whose backbones the
package leaves bit for bit: deform_conv2d's float32 rounding (1e-6, as between any two float32
kernels) grows through the random network to score differences of 3e-5..9e-5 at 800x1216 against
the demo's 1e-4 tolerance, whatever OFFSET_VARIATION is between 0 and 0.05.

`mobilenet_faster_rcnn` is torchvision's `fasterrcnn_mobilenet_v3_large_fpn(weights=None,
weights_backbone=None)` with its own settings (those of the trained model: short side 800, max
1333, 1000 proposals per level before NMS and after, RPN score threshold 0.05, NMS 0.7 / 0.5, 100
detections): a MobileNetV3-Large backbone (15 depthwise convolutions, 3x3 and 5x5, squeeze-and-
excitation blocks), an FPN on its last two stages, both at stride 32, plus a pooled level; 15
anchors per position; the box head as in the R50 model (two 1024-wide linear layers on 7x7 RoIs).
Its package configurations run it through `torchvision_cpu_ext.optimize()` (run.py). The
calibration is the one above, with these differences:
- Batch norm: built without weights, torchvision gives the backbone nn.BatchNorm2d; with weights
  it builds FrozenBatchNorm2d (eps 1e-5), which is what a user of the trained model runs, so
  `build_model` swaps them in before step 1 (the weights the builder drew are kept).
- Objectness: three levels (the two stride-32 maps and the pooled one) instead of five.
- Box head: unchanged; but both RoI-pooled maps have stride 32, so MultiScaleRoIAlign sends every
  RoI to the first one (`workload` reports them all as P5), and the model's RPN score threshold
  (0.05 on the calibrated objectness) stays as torchvision sets it.

`mobilenet_v3_large` is torchvision's classifier (weights=None, nn.BatchNorm2d as in a trained
classifier, eval) behind `ImageClassifier`, which takes the demo's list of images (ImageNet
normalisation, as the detectors' transform does) and returns logits. Calibration: step 1 on its
batch norms, over a batch of CALIBRATION_BATCH seeded images (`calibration_input`); then the last
linear layer is scaled so the logits have deviation CLASS_LOGIT_STD on that batch (a random
classifier's logits are nearly zero). No RPN, no RoI heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d

CANDIDATES_PER_IMAGE = 1000  # (box, class) pairs that reach the final NMS, per image
CLASS_LOGIT_STD = 2.0
KINDS = ("faster_rcnn", "mask_rcnn", "dcn_faster_rcnn", "mobilenet_faster_rcnn", "mobilenet_v3_large")
TITLES = {
    "faster_rcnn": "Faster R-CNN R50-FPN",
    "mask_rcnn": "Mask R-CNN R50-FPN",
    "dcn_faster_rcnn": "Faster R-CNN R50-FPN, DCNv2 in res3-res5",
    "mobilenet_faster_rcnn": "Faster R-CNN MobileNetV3-Large FPN",
    "mobilenet_v3_large": "MobileNetV3-Large classifier",
}
CLASSIFIERS = ("mobilenet_v3_large",)  # logits out, no detections
# The kinds whose package configurations run the model through torchvision_cpu_ext.optimize().
OPTIMIZED = ("mobilenet_faster_rcnn", "mobilenet_v3_large")
CALIBRATION_BATCH = 8  # images a classifier is calibrated on
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFORM_STAGES = ("layer2", "layer3", "layer4")  # res3-res5
OFFSET_STD = 1.5  # pixels (of the layer's input): the deviation of the per-tap displacements
OFFSET_VARIATION = 0.05  # pixels: the deviation over positions, per offset channel
MASK_LOGIT_MEAN, MASK_LOGIT_STD = 1.0, 0.5


class ModulatedDeformConv(nn.Module):
    """A modulated deformable 3x3 convolution (DCNv2) in place of a bottleneck's `conv2`:
    `conv` is torchvision.ops.DeformConv2d with the original convolution's weight, stride,
    padding and dilation; `offset` a 3x3 convolution beside it (same stride, padding, dilation)
    giving 18 offsets and 9 mask logits per output position, as detectron2's
    `DeformBottleneckBlock` (`conv2_offset`: offset_x, offset_y, mask chunks, mask = sigmoid)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        kh, kw = conv.kernel_size
        self.conv = DeformConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        self.offset = nn.Conv2d(
            conv.in_channels,
            3 * kh * kw,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        for p in self.parameters():
            p.requires_grad_(conv.weight.requires_grad)
        # What calibration sets the offset/mask conv to (per output channel, on its input): mean
        # `target_mean`, deviation `target_std`. Offsets: seeded displacements of deviation
        # OFFSET_STD (exactly, over the layer's taps), each varying by OFFSET_VARIATION.
        n = 2 * kh * kw
        shift = torch.randn(n)
        shift = (shift - shift.mean()) / shift.std() * OFFSET_STD
        self.register_buffer("target_mean", torch.cat([shift, torch.full((kh * kw,), MASK_LOGIT_MEAN)]))
        self.register_buffer(
            "target_std", torch.cat([torch.full((n,), OFFSET_VARIATION), torch.full((kh * kw,), MASK_LOGIT_STD)])
        )

    def offset_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offset_x, offset_y, mask = torch.chunk(self.offset(x), 3, dim=1)
        return torch.cat((offset_x, offset_y), dim=1), mask.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_mask(x)
        return self.conv(x, offset, mask)


def deform_convs(model: nn.Module) -> list[ModulatedDeformConv]:
    return [m for m in model.modules() if isinstance(m, ModulatedDeformConv)]


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


class ImageClassifier(nn.Module):
    """A classifier that takes the demo's list of [3, H, W] images in [0, 1] (as the detectors
    do), normalises them as ImageNet models expect and returns the logits [N, classes]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(-1, 1, 1))

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.net((torch.stack(images) - self.mean) / self.std)


def frozen_batch_norms(module: nn.Module) -> None:
    """Replaces every nn.BatchNorm2d in `module` by a FrozenBatchNorm2d with the same affine
    parameters and statistics, and FrozenBatchNorm2d's eps (as torchvision builds a backbone that
    is given weights)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            frozen_batch_norms(child)


def build_model(kind: str = "faster_rcnn", seed: int = 0) -> nn.Module:
    """Faster R-CNN (or Mask R-CNN) R50-FPN, 91 COCO classes, random weights (uncalibrated);
    `dcn_faster_rcnn`: Faster R-CNN with DCNv2 in res3-res5; `mobilenet_faster_rcnn`:
    torchvision's Faster R-CNN MobileNetV3-Large FPN; `mobilenet_v3_large`: the classifier (the
    module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    if kind == "mobilenet_v3_large":
        return ImageClassifier(mobilenet_v3_large(weights=None)).eval()
    if kind == "mobilenet_faster_rcnn":
        # torchvision's own settings for this model (rpn_score_thresh 0.05 included).
        model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
        frozen_batch_norms(model.backbone)
        model.rpn.head = LevelCalibratedRPNHead(model.rpn.head, levels=len(model.rpn.anchor_generator.sizes))
        return model.eval()
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
    model = (MaskRCNN if kind == "mask_rcnn" else FasterRCNN)(backbone, num_classes=91, **settings)
    model.rpn.head = LevelCalibratedRPNHead(model.rpn.head, levels=5)
    if kind == "dcn_faster_rcnn":
        # After everything else is built: the other weights are faster_rcnn's, seed for seed.
        body = model.backbone.body
        for stage in DEFORM_STAGES:
            for block in getattr(body, stage):
                block.conv2 = ModulatedDeformConv(block.conv2)
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


def _standardise_offsets(module: ModulatedDeformConv, inputs: tuple[torch.Tensor, ...]) -> None:
    """Sets the offset/mask conv so that, per output channel, its outputs on its input have mean
    `module.target_mean` and deviation `module.target_std`."""
    conv = module.offset
    conv.bias.zero_()
    out = conv(inputs[0].float())
    scale = module.target_std / out.std((0, 2, 3)).clamp_min(1e-12)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias.copy_(module.target_mean - out.mean((0, 2, 3)) * scale)


def normalise_frozen_batch_norms(backbone: nn.Module, run: Callable[[], object]) -> object:
    """Step 1: `run` (a forward of the backbone) with a pre-hook on every frozen batch norm
    (torchvision's or detectron2's class, or an nn.BatchNorm2d in eval mode) that sets its
    statistics to those of its input, just before it normalises: in network order, so each layer
    sees already calibrated inputs. The offset/mask convs of deformable convolutions are
    calibrated in the same pass, the same way."""
    hooks = [
        m.register_forward_pre_hook(_set_stats_to_input)
        for m in backbone.modules()
        if type(m).__name__ in ("FrozenBatchNorm2d", "BatchNorm2d")
    ] + [m.register_forward_pre_hook(_standardise_offsets) for m in deform_convs(backbone)]
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


def calibration_input(kind: str, height: int, width: int) -> torch.Tensor | list[torch.Tensor]:
    """What `calibrate` takes for `kind`: one seeded image that no run times, or for a classifier
    a list of CALIBRATION_BATCH of them (statistics over one image's 7x7 last maps would make every
    channel alike there, and other images' logits a hundred times larger)."""
    if kind in CLASSIFIERS:
        return [synthetic_image(height, width, seed=1000 + i) for i in range(CALIBRATION_BATCH)]
    return synthetic_image(height, width, seed=1000)


@torch.no_grad()
def calibrate(model: nn.Module, image: torch.Tensor | list[torch.Tensor]) -> dict:
    """Calibrates a `build_model` model on `image` (see the module docstring; a classifier takes
    a list of images, `calibration_input`); returns what it set."""
    model.eval()
    if isinstance(model, ImageClassifier):
        normalise_frozen_batch_norms(model.net, lambda: model(image))
        last = model.net.classifier[-1]
        factor = CLASS_LOGIT_STD / model(image).std()
        last.weight.mul_(factor)
        last.bias.mul_(factor)
        return {"logit_scale": factor.item()}
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
        work.rois_per_level.clear()
        for i in range(len(module.scales)):  # the maps it found among featmap_names
            # Summed per stride: the MobileNet FPN has two maps of stride 32 (all RoIs go to the first).
            key = f"P{int(math.log2(1 / module.scales[i]))}"
            work.rois_per_level[key] = work.rois_per_level.get(key, 0) + int((levels == i).sum())

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


@dataclass
class ClassifierWorkload:
    logit_std: float = 0.0  # over the batch's logits
    top1: list[int] = field(default_factory=list)  # predicted class, per image

    def line(self) -> str:
        return f"logits of deviation {self.logit_std:.2f}; top-1 classes {self.top1}"


def workload_line(kind: str, work: dict) -> str:
    """`line()` of a workload saved as a dict (the JSON report)."""
    return (ClassifierWorkload if kind in CLASSIFIERS else Workload)(**work).line()


def workload(
    model: nn.Module, images: list[torch.Tensor]
) -> tuple[Workload | ClassifierWorkload, list[dict] | torch.Tensor]:
    """Runs the model once on `images` and reports what it did, with its detections (a
    classifier: its logits)."""
    if isinstance(model, ImageClassifier):
        with torch.inference_mode():
            logits = model(images)
        return ClassifierWorkload(logits.std().item(), logits.argmax(1).tolist()), logits
    work = Workload()
    with torch.inference_mode(), _recording(model, work):
        out = model(images)
    work.detections = [len(o["boxes"]) for o in out]
    return work, out
