"""Token selection shared by the pruning methods."""

from __future__ import annotations

import inspect
import math

import torch

from .kernels.key_sets import top_k_mask  # noqa: F401  (the stable top-k every selecting method uses)
from .layout import VIDEO, host_to
from .method import Selection


def check_drop_ratio(method: str, ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{method}: ratio={ratio} must be in [0, 1): the share of image tokens to drop")


POSITIONS = ("original", "renumber")


def check_positions(method: str, positions: str, engine, inside: bool = False) -> None:
    """`positions` of a method that drops tokens before the LLM (or, `inside`, at layers of the LLM): original (the
    kept tokens keep their prompt positions) or renumber (contiguous positions for the kept tokens, as the authors'
    code feeds them); renumbering needs 1-D position ids: Qwen's 3-D rotary positions of an image grid have no
    contiguous renumbering. Inside the LLM the engine computes the renumbered rows' rotary tables with the text
    model's one rotary_emb(x, position_ids)."""
    if positions not in POSITIONS:
        raise ValueError(f"{method}: positions={positions!r}: use original or renumber")
    if positions == "renumber" and engine.model.config.model_type.startswith("qwen"):
        raise ValueError(f"{method}: positions=renumber needs 1-D position ids; Qwen's are 3-D (time, row, column) "
                         "per image token: use positions=original")
    rotary = getattr(engine.adapter.text_model(engine.model), "rotary_emb", None)
    if positions == "renumber" and inside and (
            rotary is None or list(inspect.signature(rotary.forward).parameters) != ["x", "position_ids"]):
        raise ValueError(f"{method}: positions=renumber inside the LLM needs one rotary table for every layer, "
                         f"which {engine.model.config.model_type} has not: use positions=original")


def unit_rows(run, image_index: torch.Tensor, frame: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """[(sample, item, current rows [n] of one unit)] for every unit (ImageTokens.units: an image, or one frame of a
    video) of every visual item, in prompt order; `image_index` and `frame` are the layout's on the current rows.
    Where the current rows are the prompt's own (nothing pruned or merged yet), one device sort groups the rows of each
    unit and the host cuts them at the unit sizes it knows (the items' coords): no host read, which at batch 1 would
    make the host wait for the vision tower. Otherwise one nonzero per unit."""
    units = [(b, item, tokens, unit) for b, items in enumerate(run.layout.images)
             for item, tokens in enumerate(items) for unit in tokens.units]  # fmt: skip
    if run.positions is not None or not units:
        return [(b, item, ((image_index[b] == item) & (frame[b] == unit)).nonzero().flatten())
                for b, item, _, unit in units]  # fmt: skip
    # key: (item, frame) in that order; rows of no unit (text, a video's frameless tokens) last
    stride = 2 + max(int(tokens.coords[:, 0].max()) for _, _, tokens, _ in units)
    video = run.layout.kind == VIDEO
    in_unit = (image_index >= 0) & ~(video & (frame < 0))
    key = torch.where(in_unit, image_index * stride + frame + 1, torch.iinfo(torch.long).max)
    grouped = key.sort(dim=1, stable=True).indices
    found, start = [], [0] * len(run.layout.images)
    for b, item, tokens, unit in units:
        size = tokens.num_tokens if not tokens.video else int((tokens.coords[:, 0] == unit).sum())
        found.append((b, item, grouped[b, start[b] : start[b] + size]))
        start[b] += size
    return found


def keep_per_image(run, ratio: float, choose) -> Selection:
    """Keep every non-visual row and, of each image, the rows `choose` picks, with count = round((1 - ratio) * n) of
    its n rows. Each frame of a video is an image here (ImageTokens.units), as a video's frames reach an image
    encoder. Images with the same n are chosen in one call (a per-image call would cost a batch of 200 images
    hundreds of host round trips): choose(samples [I], items (image index in its sample, per image), rows [I, n])
    -> [I, count] distinct indices into each image's rows. The kept visual counts are known on the host where the
    current visual rows are (Selection.visual_kept)."""
    image_index = run.current(run.layout.image_index, fill=-1)
    frame = run.current(run.layout.frame, fill=-1)
    # video tokens outside every frame (LLaVA-OneVision's closing newline) belong to no frame to choose from: they stay
    keep = (image_index < 0) | ((run.current(run.layout.kind, fill=0) == VIDEO) & (frame < 0))
    kept = None if run.visual_rows is None else list(run.visual_rows)
    by_size: dict[int, list] = {}
    for b, item, rows in unit_rows(run, image_index, frame):
        by_size.setdefault(rows.numel(), []).append((b, item, rows))
        if kept is not None:
            kept[b] -= rows.numel() - keep_count(rows.numel(), ratio)
    for n, images in by_size.items():
        samples = host_to(torch.tensor([b for b, _, _ in images]), keep.device)
        rows = torch.stack([r for _, _, r in images])
        count = keep_count(n, ratio)
        picked = rows.gather(1, choose(samples, [item for _, item, _ in images], rows, count).to(rows.device))
        keep[samples[:, None].expand_as(picked), picked] = True
    return Selection(keep=keep, visual_kept=kept)


def keep_count(available, ratio: float):
    """How many of `available` tokens survive dropping `ratio` of them (round half up, per sample): a tensor's counts
    as a tensor, an int's on the host (the same float64 arithmetic)."""
    if isinstance(available, int):
        return math.floor(available * (1.0 - ratio) + 0.5)
    return torch.floor(available.double() * (1.0 - ratio) + 0.5).long()


def keep_top_visual(run, scores: torch.Tensor, ratio: float) -> Selection:
    """Keep every non-visual row and the top (1 - ratio) of each sample's visual rows by `scores` [B, n_cur]."""
    visual = run.current(run.layout.visual, fill=False).to(scores.device)
    keep_visual = top_k_mask(scores, visual, keep_count(visual.sum(1), ratio))
    kept = None if run.visual_rows is None else [keep_count(rows, ratio) for rows in run.visual_rows]
    return Selection(keep=~visual | keep_visual, visual_kept=kept)


def row_sums(values: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """[..., rows, d] float32: for each leading index, the rows of `values` [..., m, d] summed into row index[..., m]
    (all leading indices in one flat sum), the same bits on every run. On CUDA, index_add_ and scatter_add_ add floats
    with atomics in an order that changes from run to run (a captured graph's replay would not equal its eager run),
    where index_put_ with accumulate sorts the indices first; on the CPU it is the other way round (index_put_ adds in
    parallel with atomics on large inputs, index_add_ adds row by row)."""
    leading, width = values.shape[:-2], values.shape[-1]
    count = math.prod(leading)
    flat = (index + torch.arange(count, device=index.device).view(*leading, 1) * rows).flatten()
    values = values.reshape(-1, width).float()
    sums = values.new_zeros(count * rows, width)
    if values.is_cuda:
        sums.index_put_((flat,), values, accumulate=True)
    else:
        sums.index_add_(0, flat, values)
    return sums.view(*leading, rows, width)


def cluster_means(values: torch.Tensor, assignment: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [clusters, d] in float32 of the rows of `values` [m, d] in each cluster of `assignment` [m] (zeros for an
    empty cluster), their counts [clusters]): every cluster's merge in one scatter."""
    # not bincount: on CUDA it reads the largest id on the host (integer adds: the same in any order)
    counts = torch.zeros(clusters, dtype=torch.long, device=assignment.device).index_add_(
        0, assignment, torch.ones_like(assignment))
    return row_sums(values, assignment, clusters) / counts.clamp(min=1)[:, None], counts
