"""Test-only memory probes: a per-tensor peak on any device, and the model states of a DeepSpeed engine or a torch
optimizer, which tests/training/test_memory.py compares with scaling.training.memory_estimate."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors created inside the block, on any device (a CPU stand-in for CUDA's
    `max_memory_allocated`): every op output's storage is counted until it is freed.

        with TensorMemoryTracker() as tracker:
            model(**batch, return_logits=False).loss.backward()
        tracker.peak   # bytes above what was alive before the block
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views, detach and in-place ops return storage their inputs already had (maybe from before the block)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if (isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"
                    and tensor.untyped_storage()._cdata not in inputs):
                self._track(tensor.untyped_storage())
        self.peak = max(self.peak, self.current)
        self._drop_freed()
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        ref = StorageWeakRef(storage)
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()

    def _drop_freed(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]


MASTER_WEIGHT_ATTRIBUTES = (
    "fp32_groups",  # ZeRO-0 (FP16_UnfusedOptimizer)
    "fp32_groups_flat_partition",  # ZeRO-0 with bf16 (BF16_Optimizer)
    "single_partition_of_fp32_groups",  # ZeRO-1/2
    "fp32_partitioned_groups_flat",  # ZeRO-3
)
"""Attributes of DeepSpeed's (0.19) ZeRO optimizers holding this rank's fp32 master weights."""


def zero_model_state_bytes(engine) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer states this rank holds in a DeepSpeed engine (call it after
    `engine.backward` and before `engine.step`, once a step has created the Adam states; the step's own fp32
    gradient copy is measured around `engine.step`)."""
    optimizer = engine.optimizer
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_tensor"):  # ZeRO-3: this rank's partition, plus the small params kept whole
        weights = [p.ds_tensor for p in params] + [p.data for p in params if getattr(p, "ds_persist", False)]
    else:
        weights = params
    gradients = getattr(optimizer, "averaged_gradients", None)
    gradients = [p.grad for p in params] if not gradients else _tensors(gradients)
    masters = [t for name in MASTER_WEIGHT_ATTRIBUTES for t in _tensors(getattr(optimizer, name, None))]
    adam = [t for state in optimizer.optimizer.state.values() for t in state.values() if t.numel() > 1]
    return {"parameters": _storage_bytes(weights), "gradients": _storage_bytes(gradients),
            "optimizer_states": _storage_bytes(masters) + _storage_bytes(adam)}


def torch_model_state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """The same for a plain (or DDP) model and its torch optimizer."""
    params = list(model.parameters())
    adam = [t for state in optimizer.state.values() for t in state.values() if t.numel() > 1]
    return {"parameters": _storage_bytes(params), "gradients": _storage_bytes([p.grad for p in params]),
            "optimizer_states": _storage_bytes(adam)}


def _tensors(obj) -> list[torch.Tensor]:
    """Tensors inside nested lists / tuples / dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and flat-buffer slices count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())
