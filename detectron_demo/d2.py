"""--backend detectron2: detectron2's own model-zoo R50-FPN (Faster or Mask R-CNN), random weights.

Needs detectron2 importable (see the README: it is built from source, not on PyPI). The model is
detectron2's `COCO-Detection/faster_rcnn_R_50_FPN_1x` (or `COCO-InstanceSegmentation/
mask_rcnn_R_50_FPN_1x`) config, read by path from the configs installed with detectron2, built
with `detectron2.modeling.build_model` and calibrated as the torchvision model is
(detectron_demo/model.py): frozen batch norm set to its input's statistics, objectness
standardised per FPN level, the box score threshold set for ~1000 candidates per image. Images
go in as detectron2 takes them (BGR, 0-255, already at test size) and its Instances come back as
torchvision's dicts, so run.py times and checks both backends alike.

What the package serves here: detectron2's ROIAlign calls torchvision.ops.roi_align per FPN level
(aligned, adaptive sampling), its RPN and box head torchvision.ops.batched_nms (float32 boxes,
scores in the autocast dtype), both through the dispatcher registrations; its own
FrozenBatchNorm2d (F.batch_norm on frozen statistics) is patched by the package to the fused op
with F.batch_norm's rounding (torchvision_cpu_ext/ops/frozen_batch_norm.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import (
    LevelCalibratedRPNHead,
    Workload,
    calibrate_classifier,
    normalise_frozen_batch_norms,
    standardise_objectness,
)

CONFIGS = {
    "faster_rcnn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}


class Detectron2Model(nn.Module):
    """Takes what torchvision's detection models take (a list of [3, H, W] RGB images in [0, 1],
    already at test size) and returns what they return (boxes, scores, labels per image)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        inputs = [{"image": img.flip(0) * 255, "height": img.shape[1], "width": img.shape[2]} for img in images]
        out = []
        for o in self.model(inputs):
            inst = o["instances"]
            out.append({"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "labels": inst.pred_classes})
        return out


def model_zoo_config(name: str):
    """detectron2's model-zoo yaml config `name`, read by path from the configs installed with the
    package (what model_zoo.get_config does for a yaml file, without its pkg_resources lookup,
    which fails where setuptools no longer ships pkg_resources)."""
    import detectron2
    from detectron2.config import get_cfg

    path = Path(detectron2.__file__).resolve().parent / "model_zoo" / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"detectron2's model-zoo config {name} is not installed at {path}")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def build_model(kind: str = "faster_rcnn", seed: int = 0) -> Detectron2Model:
    from detectron2.modeling import build_model as d2_build_model

    torch.manual_seed(seed)
    cfg = model_zoo_config(CONFIGS[kind])
    cfg.MODEL.DEVICE = "cpu"
    model = d2_build_model(cfg).eval()
    rpn = model.proposal_generator
    rpn.rpn_head = LevelCalibratedRPNHead(rpn.rpn_head, levels=len(rpn.in_features))
    return Detectron2Model(model).eval()


@torch.no_grad()
def calibrate(wrapper: Detectron2Model, image: torch.Tensor) -> dict:
    model = wrapper.model
    images = model.preprocess_image([{"image": image.flip(0) * 255}])
    features = normalise_frozen_batch_norms(model.backbone, lambda: model.backbone(images.tensor))
    rpn = model.proposal_generator
    head: LevelCalibratedRPNHead = rpn.rpn_head
    standardise_objectness(head, [features[f] for f in rpn.in_features], rpn.pre_nms_topk[False])
    predictor = model.roi_heads.box_predictor
    predictor.test_score_thresh = 1.0
    thresh = calibrate_classifier(predictor, lambda: wrapper([image]), background=-1)
    predictor.test_score_thresh = thresh
    return {"rpn_logit_scale": head.scale.tolist(), "rpn_logit_shift": head.shift.tolist(), "box_score_thresh": thresh}


def workload(wrapper: Detectron2Model, images: list[torch.Tensor]) -> tuple[Workload, list[dict]]:
    from detectron2.modeling.poolers import assign_boxes_to_levels

    model = wrapper.model
    work = Workload()
    pooler = model.roi_heads.box_pooler
    predictor = model.roi_heads.box_predictor

    def on_pool(module, inputs):
        boxes = inputs[1]
        levels = assign_boxes_to_levels(
            boxes, module.min_level, module.max_level, module.canonical_box_size, module.canonical_level
        )
        work.proposals = [len(b) for b in boxes]
        for i in range(module.max_level - module.min_level + 1):
            work.rois_per_level[f"P{module.min_level + i}"] = int((levels == i).sum())

    def on_predictor(module, inputs, output):
        scores = F.softmax(output[0].float(), -1)[:, :-1]
        above = (scores > predictor.test_score_thresh).sum(1)
        work.candidates = [int(c.sum()) for c in above.split(work.proposals)]

    hooks = [pooler.register_forward_pre_hook(on_pool), predictor.register_forward_hook(on_predictor)]
    try:
        with torch.inference_mode():
            out = wrapper(images)
    finally:
        for h in hooks:
            h.remove()
    work.detections = [len(o["boxes"]) for o in out]
    return work, out
