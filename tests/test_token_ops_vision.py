"""Methods that choose visual tokens before the LLM from the vision tower's attention (FasterVLM, VisionZip, VMTC):
kept and merged tokens against the papers' formulas recomputed from the tower's own attention, decoding against the
dense reference, batching, and clean unwrapping."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

import vlm_efficient as ve
from test_engine import greedy
from test_token_ops_helpers import (capture_entering, check_batched_equals_alone, check_generate, checking_host_counts,
                                    two_samples)
from vlm_efficient.selection import keep_count
from vlm_efficient.testing import FAMILIES, tiny_model

RECORDED: list = []


def _recording_attention(module, query, key, value, attention_mask=None, **kwargs):
    RECORDED.append((module, query.detach().double(), key.detach().double(), kwargs["scaling"]))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("test_vision_recording", _recording_attention)
AttentionMaskInterface.register("test_vision_recording", sdpa_mask)

CASES = [("fastervlm", f) for f in ("llava", "llava_next")] + [(m, f) for m in ("visionzip", "vmtc") for f in FAMILIES]
SPECS = {
    "fastervlm": "fastervlm:ratio=0.5",
    "visionzip": "visionzip:ratio=0.5,contextual=0.4",
    "vmtc": "vmtc:ratio=0.5,primary=0.5",
}


def _plain_inputs(model, batch):
    """The unwrapped model's layer-0 input and, per vision attention layer, its recorded (q, k, scaling) calls."""
    model.set_attn_implementation({"vision_config": "test_vision_recording"})
    RECORDED.clear()
    with capture_entering(model, [0]) as entering, torch.no_grad():
        model(**batch)
    model.set_attn_implementation({"vision_config": "sdpa"})
    calls = list(RECORDED)
    RECORDED.clear()
    return entering[0], calls


def _changed_rows(run, methods, n):
    """Layer-0 overrides for the rows whose features the method merged (they differ from the plain model's)."""
    wrapped, plain = run.scratch["test_entering"][0], run.scratch["test_plain"]
    overrides = []
    for b, positions in enumerate(run.input_positions.tolist()):
        for row, p in enumerate(positions):
            if p >= 0 and not torch.equal(wrapped[b, row], plain[b, p]):
                overrides.append((b, p, wrapped[b, row]))
    return {}, {}, {0: overrides} if overrides else {}


@pytest.mark.parametrize("method, family", CASES)
def test_generate_matches_reference(method, family):
    model, processor = tiny_model(family)
    plain, _ = _plain_inputs(model, two_samples(processor))

    def extra(run, methods, n):
        run.scratch["test_plain"] = plain
        return _changed_rows(run, methods, n)

    run, _ = check_generate(family, SPECS[method], extra=extra)
    assert run.visual_per_layer[0].tolist() != run.layout.num_visual.tolist()
    assert ve.get_adapter(model) and not model.model.__dict__.get("get_image_features")


@pytest.mark.parametrize("method, family", CASES)
def test_batched_equals_alone(method, family):
    check_batched_equals_alone(family, SPECS[method])


# ---- the formulas, recomputed from the tower's attention ------------------------------------------------------------
def _token_sources(model, batch, layout, calls):
    """Per (sample, LLM position) of an image token: (record index, token index in the record), and the records:
    per tile (CLIP: [CLS] attention, keys, ViT features) or per image (Qwen: received attention, keys)."""
    family = model.config.model_type
    if family.startswith("llava"):
        layers = model.model.vision_tower.encoder.layers
        attention = layers[len(layers) + model.config.vision_feature_layer].self_attn
        (_, q, k, scaling), = [c for c in calls if c[0] is attention]  # fmt: skip
        probs = (q @ k.transpose(-1, -2) * scaling).softmax(-1)
        records = [{"score": probs[t, :, 0, 1:].mean(0), "metric": k[t, :, 1:].mean(0)} for t in range(q.shape[0])]
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        sizes = batch.get("image_sizes")
        sources, tile, image = {}, 0, 0
        for b in range(layout.batch_size):
            for item in range(len(layout.images[b])):
                cols, tiles = 1, 1
                if family == "llava_next":
                    size, config = sizes[image].tolist(), model.config
                    pinpoints, tile_size = config.image_grid_pinpoints, config.vision_config.image_size
                    _, cols = get_anyres_image_grid_shape(size, pinpoints, tile_size)
                    tiles = image_size_to_num_patches(size, pinpoints, tile_size)
                for p in (layout.image_index[b] == item).nonzero().flatten().tolist():
                    part, r, c = layout.coords[b, p].tolist()
                    if part < 0:
                        continue  # a newline: always kept
                    t = tile if part == 0 else tile + 1 + (r // side) * cols + c // side
                    sources[(b, p)] = (t, (r % side) * side + c % side)
                tile += tiles
                image += 1
        return sources, records
    visual = model.model.visual
    attention = visual.blocks[-1].attn
    unit = visual.spatial_merge_size**2
    records = []
    for module, q, k, scaling in calls:
        if module is attention:
            probs = (q[0] @ k[0].transpose(-1, -2) * scaling).softmax(-1)
            records.append({
                "score": probs.mean(dim=(0, 1)).view(-1, unit).mean(1),
                "metric": k[0].mean(0).view(-1, unit, k.shape[-1]).mean(1),
            })  # fmt: skip
    if family == "qwen2_5_vl":  # undo the window order: match the merger's rows to the tower's output rows
        seen = {}
        h1 = visual.merger.register_forward_hook(lambda m, a, o: seen.update(block=o) and None)
        h2 = visual.register_forward_hook(lambda m, a, o: seen.update(out=o.pooler_output) and None)
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        h1.remove(), h2.remove()
        start = 0
        for record in records:
            n = record["score"].numel()
            block, out = seen["block"][start : start + n], seen["out"][start : start + n]
            order = [next(i for i in range(n) if torch.equal(block[i], out[j])) for j in range(n)]
            record["score"], record["metric"] = record["score"][order], record["metric"][order]
            start += n
    sources, image = {}, 0
    for b in range(layout.batch_size):
        for item in range(len(layout.images[b])):
            for i, p in enumerate((layout.image_index[b] == item).nonzero().flatten().tolist()):
                sources[(b, p)] = (image, i)
            image += 1
    return sources, records


def _expected(method, record, features):
    """(kept token indices, {index: merged feature}) of one record, by the paper's rule, in plain loops."""
    score, metric = record["score"], record["metric"]
    n = score.numel()
    total = int(keep_count(torch.tensor([n]), 0.5))
    ranked = sorted(range(n), key=lambda i: (-float(score[i]), i))
    if method == "fastervlm":
        return set(ranked[:total]), {}
    if method == "visionzip":
        contextual = min(int(total * 0.4 + 0.5), total - 1)
        dominant = ranked[: total - contextual]
        rest = [i for i in range(n) if i not in dominant]
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        others = [i for i in rest if i not in targets]
        unit = torch.nn.functional.normalize(metric, dim=-1)
        joined = {t: [] for t in targets}
        for i in others:
            best = max(targets, key=lambda t: (float(unit[i] @ unit[t]), -targets.index(t)))
            joined[best].append(i)
        merged = {
            t: features[t].double() + (features[js].double().mean(0) if js else 0) for t, js in joined.items()
        }
        return set(dominant) | set(targets), merged
    primary = ranked[: max(int(total * 0.5 + 0.5), 1)]
    redundant = [i for i in range(n) if i not in primary]
    clusters = min(total - len(primary), len(redundant))
    unit = torch.nn.functional.normalize(features[redundant].double(), dim=-1)
    centres = unit[[round(i * (len(redundant) - 1) / max(clusters - 1, 1)) for i in range(clusters)]]
    for _ in range(11):
        assign = [max(range(clusters), key=lambda c: (float(unit[j] @ centres[c]), -c)) for j in range(len(redundant))]
        for c in range(clusters):
            members = [j for j, a in enumerate(assign) if a == c]
            if members:
                centres[c] = torch.nn.functional.normalize(unit[members].sum(0), dim=-1)
    merged = {}
    for c in sorted(set(assign)):
        members = [redundant[j] for j, a in enumerate(assign) if a == c]
        host = max(members, key=lambda i: (float(score[i]), -i))
        merged[host] = features[members].double().mean(0)
    return set(primary) | set(merged), merged


@pytest.mark.parametrize("method, family", CASES)
def test_kept_and_merged_tokens_follow_the_formula(method, family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    plain, calls = _plain_inputs(model, batch)
    ve.wrap(model, SPECS[method])
    with capture_entering(model, [0]) as entering, torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    layout = run.layout
    sources, records = _token_sources(model, batch, layout, calls)
    clip = family.startswith("llava")
    if clip:  # the ViT features of each tile (CLS dropped): VisionZip and VMTC merge these before the projector
        with torch.no_grad():
            hidden_states = model.model.vision_tower(_tiles(model, batch), output_hidden_states=True).hidden_states
        vit = hidden_states[model.config.vision_feature_layer][:, 1:]
    kept_expected, merged_expected = {}, {}
    by_record = {}
    for (b, p), (r, i) in sources.items():
        by_record.setdefault(r, {})[i] = (b, p)
    for r, tokens in by_record.items():
        features = vit[r] if clip else torch.stack([plain[b, p] for _, (b, p) in sorted(tokens.items())])
        kept, merged = _expected(method, records[r], features)
        for i, (b, p) in tokens.items():
            kept_expected[(b, p)] = i in kept
            if i in merged:
                value = merged[i]
                if clip:
                    with torch.no_grad():
                        value = model.model.multi_modal_projector(value.float()[None])[0].double()
                merged_expected[(b, p)] = value
    positions = run.input_positions
    for (b, p), keep in kept_expected.items():
        assert (p in positions[b].tolist()) == keep, (b, p)
    for b, p in layout.visual.nonzero().tolist():  # LLaVA-NeXT's newlines (no tile row) always stay
        assert (b, p) in sources or p in positions[b].tolist(), (b, p)
    for (b, p), value in merged_expected.items():
        if not kept_expected[(b, p)]:
            continue
        row = positions[b].tolist().index(p)
        torch.testing.assert_close(entering[0][b, row].double(), value, atol=1e-4, rtol=1e-4)
    assert merged_expected or method == "fastervlm"


def _tiles(model, batch):
    """The tiles the vision tower sees, in order (LLaVA-NeXT drops padding tiles)."""
    pixel = batch["pixel_values"]
    if pixel.dim() == 4:
        return pixel
    config = model.config
    counts = [image_size_to_num_patches(s.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
              for s in batch["image_sizes"]]  # fmt: skip
    return torch.cat([pixel[i, :n] for i, n in enumerate(counts)])


def test_unwrap_restores_the_vision_tower_and_refuses_bad_parameters():
    model, processor = tiny_model("llava_next")
    batch = two_samples(processor)
    with torch.no_grad():
        reference = model(**batch).logits
    ve.wrap(model, "visionzip")
    ve.unwrap(model)
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert "get_image_features" not in model.model.__dict__
    assert not model.model.vision_tower._forward_pre_hooks and not model.model.multi_modal_projector._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    qwen, _ = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        ve.wrap(qwen, "fastervlm")
    for spec, match in [("visionzip:ratio=1", "ratio"), ("visionzip:contextual=1.5", "contextual"),
                        ("vmtc:primary=0", "primary"), ("visionzip+vmtc", "one vision-tower method")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ve.wrap(model, spec)
    assert model.config.vision_config._attn_implementation == "sdpa" and not model.model.vision_tower._forward_pre_hooks


def test_compositions():
    """A pre-LLM merge followed by in-LLM pruning matches the reference; other pairs run and unwrap cleanly."""
    model, processor = tiny_model("qwen2_vl")
    plain, _ = _plain_inputs(model, two_samples(processor))

    def extra(run, methods, n):
        run.scratch["test_plain"] = plain
        return _changed_rows(run, methods, n)

    run, _ = check_generate("qwen2_vl", "visionzip:ratio=0.5,contextual=0.4+fastv:layer=2,ratio=0.5", extra=extra)
    assert run.visual_per_layer[2].tolist() == [4, 8]
    pairs = ("vmtc+cmai", "fastv:layer=1+avl", "sparsevlm:layers=0/1/2+plphp:layer=3", "fastervlm+dyvte:rule=fixed")
    for spec in pairs:
        model, processor = tiny_model("llava")
        ve.wrap(model, spec)
        greedy(model, two_samples(processor))
        ve.unwrap(model)
        assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("spec", ["vmtc:ratio=0.5", "vmtc:ratio=0.889,primary=0.25", "vmtc:ratio=0.5,primary=1"])
def test_vmtc_tiles_chosen_together_equal_tiles_chosen_one_at_a_time(spec):
    """VMTC's batched choose_tiles of LLaVA's tiles against the base class's loop of the per-tile `choose` (the
    slow formula reference is test_kept_and_merged_tokens_follow_the_formula)."""
    from vlm_efficient.token_ops.vision_capture import VisionTowerMethod

    (method,) = ve.parse_methods(spec)
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 50, generator=generator)
    scores[:, 0] = float("inf")  # [CLS]-like rows always stay
    metrics, features = torch.randn(3, 50, 16, generator=generator), torch.randn(3, 50, 24, generator=generator)
    keep, merged = method.choose_tiles(scores, metrics, features)
    keep_one, merged_one = VisionTowerMethod.choose_tiles(method, scores, metrics, features)
    kept = int(keep_count(torch.tensor([49]), method.ratio))
    assert torch.equal(keep, keep_one) and keep[:, 1:].sum(1).tolist() == [kept] * 3
    torch.testing.assert_close(merged, merged_one)


@pytest.mark.parametrize("spec, family, known", [
    ("visionzip:ratio=0.75", "llava", [True]), ("visionzip:ratio=0.5,contextual=0.4", "llava", [True]),
    ("fastervlm:ratio=0.5", "llava", [True]), ("vmtc:ratio=0.5", "llava", [False]),
    ("visionzip:ratio=0.75", "llava_next", [False]), ("visionzip:ratio=0.75", "qwen2_vl", [False]),
    ("visionzip:ratio=0.75+fastv:layer=2,ratio=0.5", "llava", [True, True]),
    ("vmtc:ratio=0.5+fastv:layer=2,ratio=0.5", "llava", [False, False]),
])  # fmt: skip
def test_host_known_kept_counts_of_untiled_images(spec, family, known, monkeypatch):
    """On untiled CLIP images, VisionZip and FasterVLM count each sample's kept image rows on the host (tile_kept of the
    grid size), so no host read sizes the shrunk prompt: on a padded batch of one and two images the counts equal the
    keep's own, and FastV after them counts from theirs. Tiled images (LLaVA-NeXT), Qwen's per-image decisions and
    VMTC's clusters are counted on the device, and so is a FastV after them."""
    given = checking_host_counts(monkeypatch)
    model, processor = tiny_model(family)
    ve.wrap(model, spec)
    try:
        greedy(model, two_samples(processor))
    finally:
        ve.unwrap(model)
    assert given == known
