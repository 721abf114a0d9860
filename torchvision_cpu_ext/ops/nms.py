"""nms: torchvision's batched_nms path for large inputs on one C++ call.

The nms kernel itself is csrc/cpu/nms_kernel.cpp (torchvision's own fake kernel and autocast
rule serve it: boxes go to fp32 under autocast). On CPU, torchvision.ops.batched_nms runs
`_batched_nms_vanilla` above 4000 box coordinates: a Python loop calling nms once per class,
where the per-call overhead dominates (80 classes, 5000 boxes). While the override is on,
that function is replaced by one C++ call with the same result: per-class nms (classes in
parallel), the kept indices ordered by score exactly as torchvision's unstable tensor sort
orders them (csrc/cpu/nms_kernel.cpp: batched_nms). torchvision's detection models and detectron2 call it through
torchvision.ops.boxes, where it is looked up at call time.

Under autocast, torchvision's loop casts each class's boxes and scores to float32 in nms's
AutocastCPU rule; `_batched_nms` has the same rule (float64 and integer tensors kept), so mixed
dtypes (detectron2's RPN: float32 boxes, bfloat16 scores) give torchvision's indices or its error.
"""

from __future__ import annotations

import torch

_state: dict[str, object] = {"original": None}


def batched_nms_vanilla(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    original = _state["original"]
    if boxes.device.type != "cpu" or idxs.is_floating_point() or original is None:
        return original(boxes, scores, idxs, iou_threshold)  # type: ignore[operator]
    return torch.ops.torchvision_cpu_ext._batched_nms(boxes, scores, idxs, iou_threshold)


def register() -> None:
    # Imported here: in the fallback mode torchvision may only be imported once its ops exist.
    import torchvision.ops.boxes as tv_boxes

    if _state["original"] is None:
        _state["original"] = tv_boxes._batched_nms_vanilla
        tv_boxes._batched_nms_vanilla = batched_nms_vanilla


def unregister() -> None:
    import torchvision.ops.boxes as tv_boxes

    if _state["original"] is not None:
        tv_boxes._batched_nms_vanilla = _state["original"]
        _state["original"] = None


def owners() -> dict[str, str]:
    """Who provides each torchvision function this module replaces (info())."""
    import torchvision.ops.boxes as tv_boxes

    ours = tv_boxes._batched_nms_vanilla is batched_nms_vanilla
    return {"boxes._batched_nms_vanilla": "torchvision_cpu_ext" if ours else "torchvision"}
