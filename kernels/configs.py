"""Launch configs of the Triton kernels as data (configs.json): per GPU model and head_dim, with a default section.

    launch_config("k1_dense", head_dim=128, device=query.device) -> (BLOCK_M, BLOCK_N, num_warps, num_stages)

Looked up once per (kind, head_dim, device) and cached: a call pays a dict lookup. The benchmark's sweep section
measures candidates per head_dim on the card it runs on and writes the winners in this file's format
(DIR/kernel_configs.json), to be committed as that card's section."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_FILE = Path(__file__).with_name("configs.json")
KINDS = ("k1_dense", "k1_lists", "k3", "k3_sparse", "k2_rows")


@functools.lru_cache(maxsize=1)
def config_table() -> dict:
    with open(CONFIG_FILE) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device))


@functools.lru_cache(maxsize=None)
def _lookup(kind: str, head_dim: int, name: str) -> tuple[int, ...]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    table = config_table()
    for section in (table.get(name, {}), table["default"]):
        by_dim = section.get(kind, {})
        for key in (str(head_dim), "*"):
            if key in by_dim:
                return tuple(by_dim[key])
    raise KeyError(f"{CONFIG_FILE} has no {kind} config for head_dim {head_dim} (add it to 'default')")


def launch_config(kind: str, head_dim: int, device) -> tuple[int, ...]:
    """The config of `kind` for head_dim on a CUDA device: its GPU's section of configs.json, else 'default'."""
    return _lookup(kind, int(head_dim), device_name(str(device)))
