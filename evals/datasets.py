"""Benchmark data through `datasets`, in the lmms-lab schemas.

    load_table(SOURCES["pope"], data_dir="DIR")   # DIR/POPE when it exists, else the hub (lmms-lab/POPE)

A local copy is any of: a parquet / json / arrow file; a `save_to_disk` directory; a directory of parquet files as
`huggingface-cli download --repo-type dataset lmms-lab/POPE --local-dir DIR/POPE` leaves it (the split and config
are picked from the file names). Without a local copy the hub is used, and never waited on: with HF_HUB_OFFLINE=1
only the `datasets` cache is read, and an unreachable hub fails at once with a message saying what to do.

CHAIR needs COCO val2014 images, captions and instance annotations: `load_coco_chair` reads the standard COCO
folder (annotations/{instances,captions}_val2014.json, val2014/*.jpg), or lmms-lab/COCO-Caption for images and
captions plus an instances_val2014.json for the objects.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class DataError(ValueError):
    """A dataset that cannot be found: the message says where it was looked for and what to do."""


@dataclass(frozen=True)
class Source:
    hub_id: str
    split: str
    config: str | None = None

    @property
    def folder(self) -> str:  # the name of its local copy under --data-dir
        return self.hub_id.split("/")[-1]


SOURCES = {
    "pope": Source("lmms-lab/POPE", "test"),
    "mme": Source("lmms-lab/MME", "test"),
    "vqav2": Source("lmms-lab/VQAv2", "validation"),
    "textvqa": Source("lmms-lab/textvqa", "validation"),
    "scienceqa_img": Source("lmms-lab/ScienceQA", "test", "ScienceQA-IMG"),
    "gqa": Source("lmms-lab/GQA", "testdev", "testdev_balanced_instructions"),
    "gqa_images": Source("lmms-lab/GQA", "testdev", "testdev_balanced_images"),
    "coco_captions": Source("lmms-lab/COCO-Caption", "val"),
}


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or the HTTPS proxy) with a short timeout: `datasets` itself retries for long."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_local(source: Source, data_dir=None) -> Path | None:
    """DIR/<repo name> (case-insensitive), e.g. DIR/POPE for lmms-lab/POPE."""
    if data_dir is None:
        return None
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory")
    for entry in sorted(data_dir.iterdir()):
        if entry.name.lower() in (source.folder.lower(), source.hub_id.replace("/", "__").lower()):
            return entry
    return None


def _pick_split(dataset_dict, split: str, where):
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise DataError(f"{where} has splits {sorted(dataset_dict)}, not {split!r}")


def read_local(path, split: str, config: str | None = None):
    """A `datasets.Dataset` from a local file or directory (see the module docstring)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    if path.is_file():
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        if path.suffix not in builders:
            raise DataError(f"{path}: expected a .parquet, .json, .jsonl, .csv or .arrow file")
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        return _pick_split(loaded, split, path) if isinstance(loaded, datasets.DatasetDict) else loaded
    files = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))
    if config:
        files = [f for f in files if config in f.relative_to(path).parts] or files
    in_split = [f for f in files if re.match(rf"{re.escape(split)}[-_.]", f.name) or split in f.relative_to(path).parts]
    files = in_split or files
    if not files:
        raise DataError(f"{path} holds no parquet files (nor a save_to_disk dataset)")
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def load_table(source: Source, data_dir=None, path=None):
    """The local copy when there is one (`path`, or under `data_dir`), else the hub."""
    import datasets

    local = path or find_local(source, data_dir)
    if local is not None:
        return read_local(local, source.split, source.config)
    where = f"no local copy under --data-dir {data_dir}" if data_dir else "no --data-dir given"
    todo = (
        f"download it where there is network (huggingface-cli download --repo-type dataset {source.hub_id} "
        f"--local-dir DIR/{source.folder}) and pass --data-dir DIR"
    )
    if not _offline() and not hub_reachable():
        raise DataError(f"{source.hub_id}: the Hugging Face hub is not reachable and {where}: {todo}")
    try:
        return datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except (ConnectionError, OSError, FileNotFoundError) as error:
        raise DataError(f"{source.hub_id}: {error} ({where}): {todo}") from error


# ----------------------------------------------------------------------------------------------------------------
# COCO for CHAIR


def _coco_json(path: Path, name: str) -> dict:
    for candidate in (path / "annotations" / name, path / name):
        if candidate.exists():
            return json.loads(candidate.read_text())
    raise DataError(f"{path}: {name} not found (expected {path}/annotations/{name}, as in the COCO 2014 download)")


def load_coco_chair(data_dir=None, path=None, n_images: int = 500, seed: int = 0, prompt: str = ""):
    """`n_images` COCO val2014 images drawn with `seed` (the usual CHAIR protocol: 500 random images), as a Dataset
    with columns image_id, question, objects (COCO category names of its instance annotations), captions
    (reference captions), image.

    Looks for a COCO folder (`path`, or DIR/COCO, DIR/coco2014, DIR/coco) with annotations/instances_val2014.json,
    annotations/captions_val2014.json and val2014/; images may instead come from lmms-lab/COCO-Caption (a local copy
    under DIR/COCO-Caption or the hub), which holds the images and captions but no instances."""
    import datasets

    folder = Path(path) if path else None
    if folder is None and data_dir is not None:
        folder = next((Path(data_dir) / n for n in ("COCO", "coco2014", "coco") if (Path(data_dir) / n).is_dir()), None)
    if folder is None:
        raise DataError(
            "CHAIR needs COCO val2014 instance annotations: download annotations_trainval2014.zip (and val2014.zip) "
            "from cocodataset.org into DIR/COCO (DIR/COCO/annotations/instances_val2014.json, DIR/COCO/val2014/) "
            "and pass --data-dir DIR"
        )
    instances = _coco_json(folder, "instances_val2014.json")
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, set] = {im["id"]: set() for im in instances["images"]}
    for ann in instances["annotations"]:
        objects[ann["image_id"]].add(names[ann["category_id"]])
    ids = random.Random(seed).sample(sorted(objects), min(n_images, len(objects)))
    columns = {"image_id": ids, "question": [prompt] * len(ids), "objects": [sorted(objects[i]) for i in ids]}

    if (folder / "val2014").is_dir():
        captions = _coco_json(folder, "captions_val2014.json")
        refs: dict[int, list] = {i: [] for i in ids}
        for ann in captions["annotations"]:
            if ann["image_id"] in refs:
                refs[ann["image_id"]].append(ann["caption"].strip())
        files = {im["id"]: im["file_name"] for im in instances["images"]}
        rows = {**columns, "captions": [refs[i] for i in ids],
                "image": [str(folder / "val2014" / files[i]) for i in ids]}  # fmt: skip
        return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    table = load_table(SOURCES["coco_captions"], data_dir)
    where = {int(i): row for row, i in enumerate(table["id"])}
    missing = [i for i in ids if i not in where]
    if missing:
        raise DataError(f"{len(missing)} sampled COCO images (e.g. {missing[0]}) are not in lmms-lab/COCO-Caption")
    table = table.select([where[i] for i in ids])
    meta = datasets.Dataset.from_dict({**columns, "captions": [list(c) for c in table["answer"]]})
    return datasets.concatenate_datasets([meta, table.select_columns(["image"])], axis=1)  # images stay encoded
