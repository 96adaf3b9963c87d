"""Where a wrapped model's layers run: accelerate's big-model dispatch (device_map, offload) and transformers' tensor
parallelism (tp_plan="auto" under torchrun).

device_map: accelerate runs each dispatched module on its hook's execution device and moves the module's inputs there
inside the module's forward, after torch's forward pre-hooks (the engine's) have run. The engine builds a layer's
inputs (masks, rotary tables, kept rows) on that device (`execution_device`), so layers on one device share one
copy and tensors move only where the layer's device changes.

Tensor parallelism: each rank holds a contiguous slice of the attention heads (q / k / v column-wise, o_proj
row-wise). In a layer where a method acts, the engine gathers the heads of every rank before the attention call
(`HeadShards.gather`), so methods see global head indices and statistics over all heads, identical on every rank,
and hands each rank back its own heads' output (`HeadShards.local`). Layers no method acts on stay sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .method import Method


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """The device accelerate's hooks run `module` on (dispatch_model, from_pretrained(device_map=...)), else
    `default`. With cpu_offload the hooks sit on the modules that hold weights, not on the layer: `default` then."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return default


@dataclass(frozen=True)
class HeadShards:
    """This rank's slice of every decoder layer's attention heads under tensor parallelism."""

    group: object  # torch.distributed ProcessGroup of the tensor-parallel ranks
    size: int
    rank: int

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[B, local heads, ...] of every rank -> [B, all heads, ...] in global head order (rank order)."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def local(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's heads of a tensor over all heads along `dim`."""
        width = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * width, width)


# what a method may keep outside the attention call, on the rank's own heads only: it cannot run sharded
_UNSHARDABLE = {
    "a per-head pruned KV cache (decode_cache_keep)":
        lambda m: type(m).decode_cache_keep is not Method.decode_cache_keep,
    "per-head output scales applied on o_proj's input (edits_head_outputs)": lambda m: m.edits_head_outputs(),
}


def head_shards(engine) -> HeadShards | None:
    """The tensor-parallel slicing of `engine`'s decoder layers, or None where the model is not sharded. Raises where
    the plan shards attention in a way the engine cannot gather, or where a method cannot run sharded."""
    from torch.distributed.tensor import DTensor, Shard

    layer = engine.layers[0]
    o_proj = engine.adapter.head_output_module(layer)
    weight = getattr(o_proj, "weight", None)
    sharded = [name for name, p in layer.named_parameters() if isinstance(p, DTensor)]
    if not sharded:
        elsewhere = [name for name, p in engine.model.named_parameters() if isinstance(p, DTensor)]
        if elsewhere:
            raise ValueError(
                f"tensor parallelism: transformers' tp_plan for {engine.model.config.model_type} shards "
                f"{', '.join(elsewhere)} but no decoder layer: every rank would hold and run the whole language "
                "model. Load this family with device_map='auto' (layers across GPUs) instead."
            )
        return None
    if not isinstance(weight, DTensor) or tuple(weight.placements) != (Shard(1),):
        raise ValueError(
            f"tensor parallelism: the plan shards {', '.join(sharded)} of decoder layer 0, but not its attention "
            "output projection row-wise (by heads): vlm_efficient supports transformers' tp_plan='auto' (q/k/v "
            "column-wise, o_proj row-wise). Load the model with tp_plan='auto' or with device_map instead."
        )
    for method in engine._methods:
        for what, applies in _UNSHARDABLE.items():
            if applies(method):
                raise ValueError(
                    f"{method.name} keeps {what}, which holds each rank's own heads under tensor parallelism "
                    "(tp_plan): it cannot run sharded. Load the model with device_map instead."
                )
        if any(method.uses_unrotated(idx) for idx in range(engine.num_layers)):
            raise ValueError(
                f"{method.name} reads the pre-rotary queries and keys, which each rank holds for its own heads only "
                "under tensor parallelism (tp_plan): it cannot run sharded. Load the model with device_map instead."
            )
    mesh = weight.device_mesh
    if mesh.ndim > 1:  # transformers' (pp, fsdp, tp) mesh
        mesh = mesh["tp"]
    return HeadShards(group=mesh.get_group(), size=mesh.size(), rank=mesh.get_local_rank())
