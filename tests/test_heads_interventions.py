"""The head interventions on every model family: generate() with the KV cache on a left-padded batch of two (one
prompt with two images) against a dense, cache-free forward that applies each paper's formula directly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

import vlm_efficient as ve
from reference import kept_key_masks
from test_engine import greedy, two_samples
from test_heads_dense import Prompt, assert_matches, live_hidden, reference_logits, run_wrapped
from vlm_efficient.heads.pai import PAIContrastive
from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model

LAYERS = 4  # tiny models


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def keys(mask):  # [B, T] -> [B, 1, 1, T]
    return mask[:, None, None, :]


def rows(mask):  # [B, T] -> [B, 1, T, 1]
    return mask[:, None, :, None]


def move(probs, source, receivers, keep):
    """Keep `keep` of the source keys' attention, the rest to `receivers` in proportion (rows without receiver
    attention unchanged)."""
    freed = (probs * source).sum(-1, keepdim=True) * (1 - keep)
    share = probs * receivers
    total = share.sum(-1, keepdim=True)
    moved = torch.where(source, probs * keep, probs) + freed * share / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, moved, probs)


# ---- PAI, VAF, AdaptVis, PAINT: logit changes -----------------------------------------------------------------------
def test_pai_attention_term(family):
    model, batch, out, plain, _, _ = run_wrapped(family, "pai:alpha=0.5")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    edit = lambda s: torch.where(rows(p.predicting) & keys(p.visual), s + 0.5 * s.abs(), s)  # noqa: E731
    reference, _ = reference_logits(model, batch, out, logits={layer: edit for layer in range(2, LAYERS)})
    assert_matches(out, reference, plain)


def test_vaf(family):
    model, batch, out, plain, _, _ = run_wrapped(family, "vaf")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    factor = torch.where(p.visual, 1.15, torch.where(p.before, 0.95, 1.0)).double()
    edit = lambda s: torch.where(rows(p.rows_after_image()), s * keys(factor), s)  # noqa: E731
    # layers 9..14 of 32 scale to 1..2 of 4
    reference, _ = reference_logits(model, batch, out, logits={1: edit, 2: edit})
    assert_matches(out, reference, plain)


def test_adaptvis_uses_both_weights_by_confidence(family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    with torch.no_grad():
        confidence = model(**batch).logits[:, -1].softmax(-1).amax(-1)
    threshold = float(confidence.mean())  # one sample on each side
    model, batch, out, plain, _, _ = run_wrapped(family, f"adaptvis:threshold={threshold}")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    weight = torch.where(confidence < threshold, 0.5, 1.5).double()[:, None, None, None]
    edit = lambda s: torch.where(rows(p.predicting) & keys(p.visual), s * weight, s)  # noqa: E731
    reference, _ = reference_logits(model, batch, out, logits={layer: edit for layer in range(LAYERS)})
    assert_matches(out, reference, plain)


def test_paint_groups_from_vit_cls_attention():
    model, batch, out, plain, _, _ = run_wrapped("llava", "paint")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    model.set_attn_implementation({"vision_config": "eager"})
    with torch.no_grad():
        attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    first = attentions[0][:, :, 0, 1:].sum(1).double().numpy()
    late = attentions[-2][:, :, 0, 1:].sum(1).double().numpy()
    coefficient = torch.zeros(p.visual.shape, dtype=torch.float64)
    slots = iter(zip(*p.visual.nonzero(as_tuple=True)))  # image tokens in batch order, 16 patches per image
    for image in range(first.shape[0]):
        q1, q3 = np.percentile(late[image], [25, 75])
        outliers = late[image] > q3 + 1.5 * (q3 - q1)
        top = np.zeros(16, dtype=bool)
        top[np.argsort(-first[image], kind="stable")[:4]] = True
        for patch in range(16):
            b, position = next(slots)
            coefficient[b, position] = 0.7 * (top[patch] and not outliers[patch]) + 0.3 * outliers[patch]
    edit = lambda s: torch.where(rows(p.predicting), s + keys(coefficient) * s.abs(), s)  # noqa: E731
    reference, _ = reference_logits(model, batch, out, logits={layer: edit for layer in range(2, LAYERS)})
    assert_matches(out, reference, plain)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_paint_refuses_towers_without_cls_patches(family):
    model, _ = tiny_model(family)
    with pytest.raises(ValueError, match="CLS"):
        ve.wrap(model, "paint")


# ---- VAR, ACT, OCR sink, GIFT: post-softmax redistribution --------------------------------------------------------
def var_edits(method, p: Prompt) -> dict:
    """VAR's formula per layer 2..L-2, reading the hidden state the dense forward records on its way."""
    paper = method.variant == "paper"

    def redistribute(probs, layer):
        h = live_hidden(layer)[:, : p.length].double()
        x = h / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        if method.sink_dims:
            dims = torch.zeros(x.shape[-1], dtype=torch.bool)
            dims[[int(d) for d in method.sink_dims.split("/")]] = True
            dims = dims.expand(p.batch, -1)
        else:
            first = p.valid[:, : p.length].float().argmax(1)
            dims = x[torch.arange(p.batch), first].abs() > method.tau
        sink = ((x.abs() * dims[:, None, :]).amax(-1) > method.tau) & p.valid[:, : p.length]
        sink = torch.cat([sink, torch.zeros(p.batch, p.total - p.length, dtype=torch.bool)], 1)
        visual_sink = p.visual & sink
        image = (probs * keys(p.visual)).sum(-1)
        on_sinks = (probs * keys(visual_sink)).sum(-1)
        if paper:
            centric = (image >= 0.2) & (image - on_sinks >= method.rho * image)
            moved = move(probs, keys(visual_sink), keys(p.visual & ~sink), 1 - method.p)
        else:
            centric = (image >= 0.2) & (on_sinks / (image + 1e-6) <= method.rho)
            moved = move(probs, keys(sink), keys(p.visual & ~sink), method.p)
        return torch.where(centric[..., None] & rows(p.rows_after_image()), moved, probs)

    return {layer: lambda probs, layer=layer: redistribute(probs, layer) for layer in range(2, LAYERS - 1)}


@pytest.mark.parametrize("spec", ["var:tau=2", "var:tau=1.5,sink_dims=3/17/40,rho=0.3,variant=code"])
def test_var(family, spec):
    model, batch, out, plain, _, [method] = run_wrapped(family, spec)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    reference, _ = reference_logits(model, batch, out, probs=var_edits(method, p))
    assert_matches(out, reference, plain)


def test_act(family):
    model, batch, out, plain, _, _ = run_wrapped(family, "act")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)

    def calibrate(probs):
        valid = p.valid[:, : p.length]
        block = probs[:, :, : p.length, : p.length] * valid[:, None, :, None]
        seen_by = valid.flip(1).cumsum(1).flip(1)
        mean = block.sum(2) / seen_by[:, None, :].clamp(min=1)
        sinks = (mean > 0.1) & valid[:, None, :]
        for b, h in zip(*sinks.any(-1).nonzero(as_tuple=True)):
            sinks[b, h, sinks[b, h].nonzero()[0]] = False  # the first sink column is left alone
        sinks = torch.cat([sinks, torch.zeros(*sinks.shape[:2], p.total - p.length, dtype=torch.bool)], -1)
        return move(probs, sinks[:, :, None, :], ~sinks[:, :, None, :], 0.4)

    reference, _ = reference_logits(model, batch, out, probs={layer: calibrate for layer in range(2, LAYERS - 1)})
    assert_matches(out, reference, plain)


def test_ocr_sink(family):
    heads = {1: [0], 2: [1, 3], 3: [2]}
    spec = "ocr_sink:heads=" + "/".join(f"{layer}.{h}" for layer, hs in heads.items() for h in hs)
    model, batch, out, plain, _, _ = run_wrapped(family, spec)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    first = torch.zeros_like(p.valid)
    first[torch.arange(p.batch), p.valid.float().argmax(1)] = True

    def edit_for(chosen):
        def edit(probs):
            head = torch.zeros(probs.shape[1], dtype=torch.bool)
            head[chosen] = True
            return torch.where(head[None, :, None, None], move(probs, keys(first), keys(~first), 0.4), probs)

        return edit

    reference, _ = reference_logits(model, batch, out, probs={layer: edit_for(hs) for layer, hs in heads.items()})
    assert_matches(out, reference, plain)


def test_gift_paper_variant(family):
    model, batch, out, plain, _, _ = run_wrapped(family, "gift:variant=paper")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    saliency = torch.zeros(p.batch, p.total, dtype=torch.float64)

    def observe(probs):  # layer 11 of 32 -> 1 of 4
        for b in range(p.batch):
            question, image = p.question[b].nonzero().flatten(), p.visual[b].nonzero().flatten()
            attention = probs[b][:, question][:, :, image]
            top = attention.sum(-1).mean(-1).argsort(descending=True, stable=True)[:2]
            shifts = (attention[top, 1:] - attention[top, :-1]).clamp(min=0).sum((0, 1))
            shifts = shifts.clamp(max=float(shifts.mean() + 3 * shifts.std(correction=0)))
            saliency[b, image] = (shifts - shifts.min()) / (shifts.max() - shifts.min())
        return probs

    def boost(probs):  # layers 12..22 of 32 -> 2..3 of 4
        visual = (probs * keys(p.visual)).sum(-1, keepdim=True)
        boosted = torch.where(keys(p.visual), probs * keys(torch.exp(5 * saliency)), probs)
        ratio = (boosted * keys(p.visual)).sum(-1, keepdim=True) / visual
        boosted = torch.where(keys(p.question), boosted * ratio, boosted)
        boosted = boosted / boosted.sum(-1, keepdim=True)
        rank = visual[..., 0].argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        return torch.where((rank < 2)[..., None] & rows(p.predicting), boosted, probs)

    reference, _ = reference_logits(model, batch, out, probs={1: observe, 2: boost, 3: boost})
    assert_matches(out, reference, plain)
    assert saliency.max() == 1.0


# ---- VHR: head selection and head-output scaling ------------------------------------------------------------------
def last_head_outputs(model, inputs):
    captured = []
    layers = model.model.language_model.layers
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: captured.append(args[0][0, -1].double())) for layer in layers]  # fmt: skip
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return torch.stack(captured).view(len(layers), 4, -1)  # [L, H, d]


def vhr_reference_factors(model, alone: list, alpha=2.0):
    """Each sample alone: head outputs at the last prompt token with the image and with its image tokens removed."""
    image_id = ve.get_adapter(model).image_token_id(model)
    factors = []
    for inputs in alone:
        ids = inputs["input_ids"][0]
        with_image = last_head_outputs(model, inputs)
        without = last_head_outputs(model, {"input_ids": ids[ids != image_id][None]})
        vhd, norm = (with_image - without).norm(dim=-1), without.norm(dim=-1)
        sample = torch.ones(LAYERS, 4)
        for layer in range(LAYERS // 2, LAYERS):
            v, n = vhd[layer], norm[layer]
            v = torch.where((v > v.mean() + v.std()) & (n > n.mean() + n.std()), 0.0, v)
            sample[layer] = torch.where(v > v.median(), alpha, 1.0)
        factors.append(sample)
    return torch.stack(factors)


def samples_alone(processor):
    ph = image_placeholder(processor)
    texts = [
        (f"what is {ph} this", [tiny_image(0)]),
        (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(1), tiny_image(2)]),
    ]
    return [tiny_batch(processor, [sample]) for sample in texts]


def test_vhr(family):
    model, batch, out, plain, _, _ = run_wrapped(family, "vhr")
    _, processor = tiny_model(family)
    factors = vhr_reference_factors(model, samples_alone(processor))
    assert bool((factors == 2.0).any())
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    head_scale = {
        layer: torch.where(p.predicting[..., None], factors[:, None, layer], 1.0) for layer in range(2, LAYERS)
    }
    reference, _ = reference_logits(model, batch, out, head_scale=head_scale)
    assert_matches(out, reference, plain)


def test_vhr_head_factors_batched_equal_each_sample(family):
    from vlm_efficient.heads.vhr import vhr_head_factors

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    assert torch.equal(vhr_head_factors(model, batch), vhr_reference_factors(model, samples_alone(processor)))


# ---- PAI's contrastive term ------------------------------------------------------------------------------------------
def test_pai_contrastive_logits_processor(family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, "pai:alpha=0.5")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=5, do_sample=False, output_logits=True, output_scores=True,
            return_dict_in_generate=True, logits_processor=LogitsProcessorList([PAIContrastive(model, gamma=1.1)]),
        )  # fmt: skip
    ve.unwrap(model)
    image_id = ve.get_adapter(model).image_token_id(model)
    prompt = batch["input_ids"].shape[1]
    for step, (raw, scores) in enumerate(zip(out.logits, out.scores)):
        raw = raw.double().clone()
        raw[:, model.generation_config.suppress_tokens] = -float("inf")
        conditional = raw.log_softmax(-1)
        for b in range(raw.shape[0]):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
            ids = torch.cat([ids[ids != image_id], out.sequences[b, prompt : prompt + step]])
            with torch.no_grad():
                unconditional = model(input_ids=ids[None]).logits[0, -1].double().log_softmax(-1)
            expected = 1.1 * (conditional[b] - unconditional) + unconditional
            expected[conditional[b] < np.log(0.1) + conditional[b].max()] = -float("inf")
            finite = torch.isfinite(expected)
            assert torch.equal(finite, torch.isfinite(scores[b]))
            torch.testing.assert_close(scores[b][finite].double(), expected[finite], atol=1e-4, rtol=1e-4)
    # the side stream left the main generation intact: its logits still follow the attention term alone
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    edit = lambda s: torch.where(rows(p.predicting) & keys(p.visual), s + 0.5 * s.abs(), s)  # noqa: E731
    reference, _ = reference_logits(model, batch, out, logits={layer: edit for layer in range(2, LAYERS)})
    assert_matches(out, reference)


# ---- composition with token_ops, batching ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", ["fastv:layer=2,ratio=0.5+pai:alpha=0.5", "pdrop:layers=1/2/3,ratio=0.5+vaf", "fastv:layer=2+var:tau=2"]
)
def test_composes_with_pruning(family, spec):
    """The pruned keys are masked from their layer on (kept_key_masks); the head method acts on what is left."""
    model, batch, out, plain, run, methods = run_wrapped(family, spec)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    masks = {layer: kept[:, None, :] for layer, kept in kept_key_masks(run, p.total, LAYERS).items()}
    edits = {}
    if "pai" in spec:
        pai = lambda s: torch.where(rows(p.predicting) & keys(p.visual), s + 0.5 * s.abs(), s)  # noqa: E731
        edits["logits"] = {layer: pai for layer in range(2, LAYERS)}
    elif "vaf" in spec:
        factor = torch.where(p.visual, 1.15, torch.where(p.before, 0.95, 1.0)).double()
        vaf = lambda s: torch.where(rows(p.rows_after_image()), s * keys(factor), s)  # noqa: E731
        edits["logits"] = {1: vaf, 2: vaf}
    else:
        edits["probs"] = var_edits(methods[1], p)
    reference, _ = reference_logits(model, batch, out, masks=masks, **edits)
    assert_matches(out, reference, plain)


@pytest.mark.parametrize("spec", ["var:tau=2", "gift:words=all,query_start=1,query_end=1", "gift:variant=paper",
                                  "adaptvis"])
def test_batched_equals_alone(family, spec):
    model, processor = tiny_model(family)
    ve.wrap(model, spec)
    together = greedy(model, two_samples(processor))
    for b, alone_batch in enumerate(samples_alone(processor)):
        alone = greedy(model, alone_batch)
        torch.testing.assert_close(
            torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0], atol=1e-4, rtol=1e-4
        )
    ve.unwrap(model)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pai:alpha=-1", "alpha"),
        ("vaf:layers=7", "not in"),
        ("act:beta=2", "beta"),
        ("var:variant=other", "variant"),
        ("var:sink_dims=9999", "sink_dims"),
        ("ocr_sink", "heads=layer.head"),
        ("ocr_sink:heads=1x2", "layer.head"),
        ("gift:saliency_layer=3", "before the boosted layers"),
        ("gift:variant=other", "variant"),
        ("gift:beta=2", "variant=paper"),
        ("gift", "words=all"),  # content words need a tokenizer: an in-memory model has no name_or_path
        ("vhr:layers=2-9", "not in"),
    ],
)
def test_bad_parameters_are_clear_errors(spec, message):
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        ve.wrap(model, spec)
    assert not ve.is_wrapped(model)


def test_pai_contrastive_from_the_spec_string(family):
    """`pai:contrastive=1.1` is PAI with its contrastive term: the wrapped model's generate() adds PAIContrastive
    (Method.logits_processors) before the call's own processors, with the scores and tokens of the processor passed
    by hand; vlm_efficient.logits_processors lists it; unwrap restores the class's generate(); contrastive=0 (the
    default) adds nothing; a negative gamma is refused."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    seen = []

    def own(input_ids, scores):  # the call's own processor: it sees the contrastive scores
        seen.append(scores.clone())
        return scores

    ve.wrap(model, "pai:alpha=0.5")
    assert ve.logits_processors(model) == [] and "generate" not in vars(model)
    with torch.no_grad():
        by_hand = model.generate(**batch, **kw, logits_processor=LogitsProcessorList([PAIContrastive(model, 1.1)]))
    ve.unwrap(model)
    ve.wrap(model, "pai:alpha=0.5,contrastive=1.1")
    [processor_] = ve.logits_processors(model)
    assert isinstance(processor_, PAIContrastive) and processor_.gamma == 1.1
    with torch.no_grad():
        from_spec = model.generate(**batch, **kw, logits_processor=LogitsProcessorList([own]))
    copied = copy.deepcopy(model)  # its own processor, on the copy
    [copied_processor] = ve.logits_processors(copied)
    assert copied_processor is not processor_ and copied_processor.model is copied
    with torch.no_grad():
        assert torch.equal(copied.generate(**batch, **kw).sequences, from_spec.sequences)
    ve.unwrap(model)
    assert "generate" not in vars(model)
    assert torch.equal(from_spec.sequences, by_hand.sequences)
    for mine, theirs, passed in zip(from_spec.scores, by_hand.scores, seen):
        assert torch.equal(mine, theirs) and torch.equal(passed, theirs)
    with pytest.raises(ValueError, match="contrastive=-1.0 must be >= 0"):
        ve.wrap(model, "pai:contrastive=-1")
    assert not ve.is_wrapped(model)


def test_pai_contrastive_instance_serves_several_generate_calls():
    model, processor = tiny_model("qwen2_vl")
    ve.wrap(model, "pai")
    shared = PAIContrastive(model)

    def run(batch, contrastive):
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, logits_processor=LogitsProcessorList([contrastive]))

    first, second = samples_alone(processor)
    run(first, shared)
    reused = run(second, shared)
    fresh = run(second, PAIContrastive(model))
    ve.unwrap(model)
    assert torch.equal(reused.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reused.scores), torch.stack(fresh.scores))


def test_unwrap_removes_the_hooks_methods_add():
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    before = greedy(model, batch)
    ve.wrap(model, "vhr+adaptvis+paint")
    greedy(model, batch)
    ve.unwrap(model)
    vision_layers = model.model.vision_tower.encoder.layers
    assert not model._forward_pre_hooks
    assert not any(layer.self_attn._forward_pre_hooks for layer in vision_layers)
    assert torch.equal(greedy(model, batch).sequences, before.sequences)


@pytest.mark.parametrize("layers,source,boosted", [(32, 11, tuple(range(12, 23))), (6, 2, (3, 4)), (4, 1, (2, 3))])
def test_gift_default_layers_keep_the_saliency_layer_first(layers, source, boosted):
    """The paper's layers 11 / 12..22 of 32, scaled: on shallow models (the 6-layer testbed) 11 and 12 round to one
    layer; the saliency layer must stay before the boosted ones."""
    from types import SimpleNamespace

    from vlm_efficient.heads.gift import GIFT

    gift = GIFT(words="all")  # content words would load the model's tokenizer
    gift.bind(SimpleNamespace(num_layers=layers))
    assert (gift.source, gift.chosen) == (source, boosted)
