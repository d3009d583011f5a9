"""Exponential moving average of the trainable weights (BiomedGPT evaluated EMA weights), kept in fp32."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file


class EMA:
    """shadow ← decay · shadow + (1 − decay) · weight, after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's trainable weights with the averages (before export / evaluation)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def save(self, path: str | os.PathLike) -> None:
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(path))

    def load(self, path: str | os.PathLike) -> None:
        loaded = load_file(str(path))
        missing = set(self.shadow) - set(loaded)
        if missing:
            raise KeyError(f"{path} lacks EMA weights for {sorted(missing)[:3]}...; was it written by the same model?")
        self.shadow = {n: loaded[n].to(self.shadow[n].device) for n in self.shadow}
