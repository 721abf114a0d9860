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

from ._common import AUTOCAST_CPU_KEYS, autocast_cast

_state: dict[str, object] = {"original": None, "own_lib": None}


def batched_nms_vanilla(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    original = _state["original"]
    if boxes.device.type != "cpu" or idxs.is_floating_point() or original is None:
        return original(boxes, scores, idxs, iou_threshold)  # type: ignore[operator]
    return torch.ops.torchvision_cpu_ext._batched_nms(boxes, scores, idxs, iou_threshold)


def _fake_batched_nms(boxes, scores, idxs, iou_threshold):
    kept = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty(kept, dtype=torch.long)


def _autocast_batched_nms(boxes, scores, idxs, iou_threshold):
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        return torch.ops.torchvision_cpu_ext._batched_nms(
            autocast_cast(boxes), autocast_cast(scores), idxs, iou_threshold
        )


def register(lib: torch.library.Library) -> None:
    if _state["own_lib"] is None:  # our own op: its fake kernel and autocast rule are registered once
        torch.library.register_fake("torchvision_cpu_ext::_batched_nms", _fake_batched_nms)
        own = torch.library.Library("torchvision_cpu_ext", "IMPL")
        own.impl("_batched_nms", _autocast_batched_nms, "AutocastCPU")
        _state["own_lib"] = own
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
