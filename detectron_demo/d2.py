"""--backend detectron2: detectron2's own model-zoo R50-FPN, when detectron2 is importable.

detectron2 is not on this machine's package registry, so this path has not been run here; it is
written against detectron2's public API (model_zoo.get_config, modeling.build_model, the
Instances output) and calibrated the same way as the torchvision model (detectron_demo/model.py):
frozen batch norm set to its input's statistics, objectness standardised per level, the box
score threshold set for ~1000 candidates per image. Its ROIAlign calls torchvision.ops.roi_align
(ROIAlignV2: aligned, adaptive sampling) and its NMS torchvision.ops.batched_nms, so the
package serves it through the same dispatcher registrations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import CANDIDATES_PER_IMAGE, CLASS_LOGIT_STD, LevelCalibratedRPNHead, Workload

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


def build_model(kind: str = "faster_rcnn", seed: int = 0) -> Detectron2Model:
    from detectron2 import model_zoo
    from detectron2.modeling import build_model as d2_build_model

    torch.manual_seed(seed)
    cfg = model_zoo.get_config(CONFIGS[kind])
    cfg.MODEL.DEVICE = "cpu"
    model = d2_build_model(cfg).eval()
    rpn = model.proposal_generator
    rpn.rpn_head = LevelCalibratedRPNHead(rpn.rpn_head, levels=len(rpn.in_features))
    return Detectron2Model(model).eval()


def _set_stats_to_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    x = inputs[0].float()
    module.running_mean.copy_(x.mean((0, 2, 3)))
    module.running_var.copy_(x.var((0, 2, 3), unbiased=False))


@torch.no_grad()
def calibrate(wrapper: Detectron2Model, image: torch.Tensor) -> dict:
    model = wrapper.model
    images = model.preprocess_image([{"image": image.flip(0) * 255}])
    frozen = [m for m in model.backbone.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    hooks = [m.register_forward_pre_hook(_set_stats_to_input) for m in frozen]
    try:
        features = model.backbone(images.tensor)
    finally:
        for h in hooks:
            h.remove()
    rpn = model.proposal_generator
    head: LevelCalibratedRPNHead = rpn.rpn_head
    head.scale.fill_(1.0)
    head.shift.fill_(0.0)
    logits, _ = head([features[f] for f in rpn.in_features])
    k = rpn.pre_nms_topk[False]
    for i, t in enumerate(logits):
        top = t.flatten().topk(min(k, t.numel())).values
        std = top.std().clamp_min(1e-12)
        head.scale[i] = 1.0 / std
        head.shift[i] = -top.mean() / std
    predictor = model.roi_heads.box_predictor
    captured: list[torch.Tensor] = []
    handle = predictor.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        predictor.test_score_thresh = 1.0
        wrapper([image])
        std = captured[0].std()
        predictor.cls_score.weight.mul_(CLASS_LOGIT_STD / std)
        predictor.cls_score.bias.mul_(CLASS_LOGIT_STD / std)
        captured.clear()
        wrapper([image])
    finally:
        handle.remove()
    scores = F.softmax(captured[0], -1)[:, :-1].flatten()  # detectron2's background is last
    thresh = scores.topk(min(CANDIDATES_PER_IMAGE, scores.numel())).values[-1].item()
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
