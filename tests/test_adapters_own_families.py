"""Every family difference a method needs is reached through the model's adapter (vlm_efficient/adapters.py): method
files never read the family (`model_type`) or the family's config and modules directly; and the value matching that
maps LLaVA-NeXT's tiles onto the LLM rows (instead of reading the image sizes off a replaced get_image_features)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHOD_FOLDERS = ("token_ops", "heads")
FAMILY_ATTRIBUTES = {"model_type", "vision_config"}  # what a method would branch or size on per family


def family_reads(source: str) -> list[tuple[int, str]]:
    """(line, what) of each family read in a module's code (docstrings and comments do not count): an attribute
    `.model_type` / `.vision_config`, the string "model_type" (getattr, config dicts), or `<x>.model.model`'s parts
    (the HF model's inner modules, whose names differ per family)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in FAMILY_ATTRIBUTES:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Constant) and node.value in FAMILY_ATTRIBUTES:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "model" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "model":  # fmt: skip
            found.append((node.lineno, f"model.model.{node.attr}"))
    return found


def test_method_files_ask_the_adapter_for_family_differences():
    files = sorted(path for folder in METHOD_FOLDERS for path in (ROOT / folder).rglob("*.py"))
    assert len(files) > 30
    reads = {str(path.relative_to(ROOT)): family_reads(path.read_text()) for path in files}
    assert not {path: found for path, found in reads.items() if found}, "ask engine.adapter instead"


@pytest.mark.parametrize("code, expected", [
    ("if engine.model.config.model_type == 'llava': pass", [(1, ".model_type")]),
    ("side = config.vision_config.image_size", [(1, ".vision_config")]),
    ("family = getattr(config, 'model_type')", [(1, "'model_type'")]),
    ("tower = model.model.visual", [(1, "model.model.visual")]),
    ('"""Needs model_type llava."""\nvisual = run.layout.visual', []),
])  # fmt: skip
def test_family_reads_are_found(code, expected):
    assert family_reads(code) == expected


def _slow_sources(tiles, rows):
    """Per row, the first tile row of equal bits, or -1."""
    return [next((i for i, tile in enumerate(tiles) if torch.equal(tile, row)), -1) for row in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tile_sources_find_each_row_in_the_tiles(dtype):
    from vlm_efficient.token_ops.vision_capture import tile_sources

    generator = torch.Generator().manual_seed(0)
    tiles = torch.randn(40, 16, generator=generator).to(dtype)
    picked = torch.randint(0, 40, (2, 25), generator=generator)
    rows = tiles[picked].clone()
    rows[1, 3] = torch.randn(16, generator=generator).to(dtype)  # in no tile
    rows[0, 5, 0] = -tiles[picked[0, 5], 0]  # one value differs
    source, found = tile_sources(tiles, rows)
    expected = torch.tensor([_slow_sources(tiles, sample) for sample in rows])
    assert torch.equal(found, expected >= 0) and found.sum() == 48
    assert torch.equal(source[found], expected[found])
