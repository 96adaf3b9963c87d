"""Cross-modal masks on every model family: generate() with the KV cache on a left-padded batch against a dense,
cache-free forward with the mask's rule written out pair by pair (prompt rows only; decoding rows keep the causal
mask). Also AKI (pairs added beyond causality) and Vista-LLaMA's equal distance (logits without rotary position,
prompt and decoding rows), alone and composed with token pruning."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from reference import kept_key_masks
from test_engine import greedy, two_samples
from test_heads_dense import Prompt, assert_matches, reference_logits, run_wrapped
from vlm_efficient.attention import edited_attention
from vlm_efficient.method import AttentionEdit
from vlm_efficient.testing import FAMILIES, tiny_model

LAYERS = 4


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def check(family, spec, blocked, layers=range(LAYERS)):
    """blocked(p, run) -> [B, T, T] pairs (query row, key) the rule forbids; generated rows are never blocked."""
    model, batch, out, plain, run, _ = run_wrapped(family, spec)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    mask = ~(blocked(p, run) & ~p.generated[:, :, None])
    reference, _ = reference_logits(model, batch, out, masks={layer: mask for layer in layers})
    assert_matches(out, reference, plain)


def pairs(rows, keys):  # [B, T] x [B, T] -> [B, T, T]
    return rows[:, :, None] & keys[:, None, :]


def other(p):  # [1, T, T]: key is not the query row itself
    return ~torch.eye(p.total, dtype=torch.bool)[None]


def test_naavit(family):
    check(family, "naavit", lambda p, run: pairs(p.visual, p.visual) & other(p))


def test_ee_mllm(family):
    check(family, "ee_mllm", lambda p, run: pairs(p.visual, p.valid) & other(p))


def test_window(family):
    def blocked(p, run):
        grow = p.total - p.length
        coords = torch.nn.functional.pad(run.layout.coords, (0, 0, 0, grow), value=-1)
        image = torch.nn.functional.pad(run.layout.image_index, (0, grow), value=-1)
        ci, cj = coords[:, :, None], coords[:, None, :]
        near = (
            (image[:, :, None] == image[:, None, :])
            & (ci[..., 0] == cj[..., 0])
            & (ci[..., 0] >= 0)
            & ((ci[..., 1] - cj[..., 1]).abs() <= 1)
            & ((ci[..., 2] - cj[..., 2]).abs() <= 1)
        )
        return pairs(p.visual, p.visual) & other(p) & ~near

    check(family, "window:size=1", blocked)


KNOCKOUTS = {
    # question rows = text after the last image without the last position; last = the last prompt position
    "question-image/last-image": lambda p, last: pairs((p.question & ~last) | last, p.visual),
    "question-image/image-before": lambda p, last: pairs(p.question & ~last, p.visual) | pairs(p.visual, p.before),
}


@pytest.mark.parametrize("edges", KNOCKOUTS)
def test_knockout(family, edges):
    def blocked(p, run):
        last = torch.zeros_like(p.valid)
        last[:, p.length - 1] = True
        return KNOCKOUTS[edges](p, last)

    check(family, f"knockout:edges={edges},layers=1-2", blocked, layers=(1, 2))


def test_cmai(family):
    model, batch, out, plain, _, _ = run_wrapped(family, "cmai")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)

    def inhibit(probs):
        kept = probs.clone()
        for b in range(p.batch):
            text, image = p.text[b, : p.length], p.visual[b, : p.length]
            for i in p.after_first[b].nonzero().flatten().tolist():
                seen = image.clone()
                seen[i + 1 :] = False
                # focus[h, j] = sum over text t' of A[i, t'] A[t', j]
                block = probs[b, :, : p.length, : p.length]
                focus = torch.einsum("ht,htj->hj", block[:, i] * text, block)
                mean = (focus * seen).sum(-1, keepdim=True) / seen.sum()
                low = (focus < mean) & seen
                kept[b, :, i, : p.length] = probs[b, :, i, : p.length].masked_fill(low, 0)
        return kept / kept.sum(-1, keepdim=True).clamp_min(1e-300)

    reference, _ = reference_logits(model, batch, out, probs={layer: inhibit for layer in range(LAYERS)})
    assert_matches(out, reference, plain)


# ---- AKI and equal distance ----------------------------------------------------------------------------------------
def later(p):  # [1, T, T]: the key comes after the query row
    return torch.ones(p.total, p.total, dtype=torch.bool).triu(1)[None]


def check_edit(family, spec, edit, layers=range(LAYERS), with_pruning=False):
    """edit(p, batch) -> {"allow": [B, T, T]} or {"unrotated": [B, T, T]}, the rule written out over prompt +
    generated positions; with pruning, each layer's pruned keys are masked as well. Logits within 1e-4 and the same
    greedy tokens."""
    model, batch, out, plain, run, _ = run_wrapped(family, spec)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    edits = {name: {layer: pairs_ for layer in layers} for name, pairs_ in edit(p, batch).items()}
    if with_pruning:
        kept = kept_key_masks(run, p.total, LAYERS)
        assert any(bool((~m[:, : p.length] & p.valid[:, : p.length]).any()) for m in kept.values()), "nothing pruned"
        edits["masks"] = {layer: m[:, None, :].expand(-1, p.total, -1) for layer, m in kept.items()}
    reference, _ = reference_logits(model, batch, out, **edits)
    assert_matches(out, reference, plain)
    chosen = reference.clone()
    chosen[..., list(model.generation_config.suppress_tokens or [])] = float("-inf")  # as generate() does
    assert torch.equal(chosen.argmax(-1), out.sequences[:, p.length :]), "greedy tokens differ"


def test_aki(family):
    # paper: an image row also sees every text token of the prompt after it
    check_edit(family, "aki", lambda p, batch: {"allow": pairs(p.visual, p.text) & later(p)})


def aki_code_spans(p, input_ids, end_token):
    """The public code's span, from input_ids: each run of image tokens also sees every prompt token after the
    run, up to and including the first `end_token` after it (else to the prompt's end)."""
    allow = torch.zeros(p.batch, p.total, p.total, dtype=torch.bool)
    for b in range(p.batch):
        visual = p.visual[b, : p.length].tolist()
        start = 0
        while start < p.length:
            if not visual[start]:
                start += 1
                continue
            end = start
            while end < p.length and visual[end]:
                end += 1
            last = p.length - 1
            for j in range(end, p.length):
                if int(input_ids[b, j]) == end_token:
                    last = j
                    break
            allow[b, start:end, end : last + 1] = p.valid[b, end : last + 1]
            start = end
    return allow


def test_aki_code_variant(family):
    _, processor = tiny_model(family)
    ids = two_samples(processor)["input_ids"]
    end_token = int(ids[1, -3])  # a token of the second prompt's question, after both images
    check_edit(
        family, f"aki:variant=code,end_token={end_token}",
        lambda p, batch: {"allow": aki_code_spans(p, batch["input_ids"], end_token)},
    )


def vista_pairs(p, variant):
    """Vista-LLaMA's unrotated pairs: paper = one visual and one text token (generated tokens are text), code =
    every visual key."""
    if variant == "code":
        return p.visual[:, None, :].expand(-1, p.total, -1)
    text = p.text | p.generated
    return pairs(text, p.visual) | pairs(p.visual, text)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_equal_distance(family, variant):
    check_edit(family, f"equal_distance:variant={variant}", lambda p, batch: {"unrotated": vista_pairs(p, variant)})


@pytest.mark.parametrize("pruning", ["fastv:layer=2,ratio=0.5", "divprune:ratio=0.5"])
def test_equal_distance_with_pruning(family, pruning):
    # the pre-rotary prompt keys kept for decoding follow each layer's kept rows (layer 2, or before the LLM)
    check_edit(family, f"equal_distance+{pruning}", lambda p, batch: {"unrotated": vista_pairs(p, "paper")},
               with_pruning=True)


def test_aki_with_pruning(family):
    check_edit(family, "aki+fastv:layer=2,ratio=0.5",
               lambda p, batch: {"allow": pairs(p.visual, p.text) & later(p)}, with_pruning=True)


def test_edit_composition_order():
    """edited_attention: an `allow` adds a pair beyond causality, a `mask` of any edit removes it whatever the
    order; `unrotated` pairs take their logit from the pre-rotary q / k (and need them)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    future = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    future[..., 0, 2] = True  # row 0 may see key 2
    causal = edited_attention(q, k, v, None, 0.5, [AttentionEdit(logit_scale=torch.ones(1))])
    added = edited_attention(q, k, v, None, 0.5, [AttentionEdit(allow=future)])
    assert not torch.allclose(added[:, 0], causal[:, 0]) and torch.allclose(added[:, 1:], causal[:, 1:])
    for edits in ([AttentionEdit(allow=future), AttentionEdit(mask=~future)],
                  [AttentionEdit(mask=~future), AttentionEdit(allow=future)]):
        assert torch.allclose(edited_attention(q, k, v, None, 0.5, edits), causal)
    marked = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="uses_unrotated"):
        edited_attention(q, k, v, None, 0.5, [AttentionEdit(unrotated=marked)])
    q0, k0 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    unrot = edited_attention(q, k, v, None, 0.5, [AttentionEdit(unrotated=marked)], unrotated=(q0, k0))
    same = edited_attention(q0, k0, v, None, 0.5, [AttentionEdit(logit_scale=torch.ones(1))])
    assert torch.allclose(unrot, same)


def test_equal_distance_needs_the_pre_rotary_modules(monkeypatch):
    model, _ = tiny_model("llava")
    monkeypatch.setattr(type(ve.get_adapter(model)), "pre_rotary_modules", lambda self, attention: attention.qkv)
    with pytest.raises(ValueError, match="before rotary"):
        ve.wrap(model, "equal_distance")
    assert not ve.is_wrapped(model)


@pytest.mark.parametrize("spec", [
    "knockout:edges=question-pixels", "knockout:edges=", "window:size=-1", "aki:variant=both", "aki:end_token=5",
    "equal_distance:variant=keys", "equal_distance:layers=9",
])
def test_bad_mask_parameters(spec):
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError):
        ve.wrap(model, spec)


@pytest.mark.parametrize("padded", [False, True])
def test_edits_on_a_few_rows_run_those_rows_only(padded):
    """Where every edit limits itself to some rows (PAI's last row, VAF's question), the engine's dense path runs SDPA
    for all rows and the edited attention for those rows only (attention.edited_rows_attention): the same output as
    the dense edited attention over every row, with GQA, per-row and per-key terms, a mask, a row-wise post-softmax
    function, samples editing different numbers of rows, and left padding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vlm_efficient.attention import edited_rows_attention, rows_edited

    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, dim = 2, 4, 2, 12, 8
    q = torch.randn(batch, heads, q_len, dim)
    k, v = torch.randn(batch, kv_heads, q_len, dim), torch.randn(batch, kv_heads, q_len, dim)
    mask = None
    if padded:  # sample 0 is left-padded by 3 tokens: a boolean causal mask over the real ones
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        mask = causal.expand(batch, 1, q_len, q_len).clone()
        mask[0, :, :, :3] = False
        mask[0, 0, :3, :3] = torch.eye(3, dtype=torch.bool)  # padding rows see themselves (no NaN), as HF's do
    rows = torch.zeros(batch, q_len, dtype=torch.bool)
    rows[0, -1] = True
    rows[1, -3:] = True
    last = torch.zeros(batch, q_len, dtype=torch.bool)
    last[:, -1] = True
    edits = [
        AttentionEdit(logit_abs=torch.rand(batch, heads, 1, q_len), rows=rows, rowwise_post=True,
                      post_softmax=lambda probs: probs * torch.linspace(0.5, 1.5, heads)[None, :, None, None]),
        AttentionEdit(logit_bias=torch.randn(batch, 1, q_len, q_len), mask=torch.rand(batch, 1, q_len, q_len) > 0.2,
                      rows=last),
    ]  # fmt: skip
    assert torch.equal(rows_edited(edits), rows | last)
    reference = edited_attention(q, k, v, mask, 0.35, edits)

    class Module:
        is_causal, num_key_value_groups, training = True, heads // kv_heads, False

    unedited, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.35)
    out = edited_rows_attention(q, k, v, mask, 0.35, edits, rows | last, 3, unedited)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unedited[:, -1], reference[:, -1], atol=1e-3)  # the edits do change the edited rows
    # an edit on every row, or a post-softmax function that is not row-wise: the whole call stays dense
    assert rows_edited([AttentionEdit(logit_abs=torch.ones(1))]) is None
    assert rows_edited([AttentionEdit(rows=rows, post_softmax=lambda probs: probs)]) is None
