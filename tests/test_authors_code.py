"""Each method against a transcription of its authors' public code: the selection or edit function of the authors'
repository, transcribed as written (names, order of operations, tie rules), run on the same tensors as the library,
with equal kept sets or equal edited probabilities asserted. Each test names the repository and file it transcribes.
Where the library's default follows the paper instead, the test runs the library's code variant (`variant=code`,
`count=code`, ...)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import vlm_efficient as ve
from reference import masked_reference
from test_heads_dense import Prompt, assert_matches, dense, live_hidden, reference_logits, run_wrapped
from vlm_efficient.heads.gift import GIFT, code_saliency, content_tokens
from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image, tiny_model


# ---- GIFT: github.com/amazon-science/GIFT ---------------------------------------------------------------------------
def gift_authors_heatmap(attentions, token_indices, selected_query_tokens, layers, alpha):
    """inference.py: process_attention_maps, then compute_attention_heatmap (batch of one; `attentions` is the
    per-layer tuple of output["attentions"][0])."""
    attn = [attentions[l] for l in layers]
    attn = torch.stack(attn).squeeze(1)
    attn = attn[:, :,
                token_indices["query_start_idx"]:token_indices["query_end_idx"] + 1,
                token_indices["vision_start_idx"]:token_indices["vision_end_idx"] + 1] - \
        attn[:, :,
             token_indices["query_start_idx"] - 1:token_indices["query_end_idx"],
             token_indices["vision_start_idx"]:token_indices["vision_end_idx"] + 1]
    attn[attn < 0.0] = 0.0
    attn = attn[:, :, selected_query_tokens]
    k = attn.size(1) // 2
    selected_heads = torch.topk(attn.sum(dim=(2, 3)), k=k, dim=-1).indices
    selected_heads = selected_heads.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, attn.size(-2), attn.size(-1))
    attn = attn.gather(dim=1, index=selected_heads)
    # compute_attention_heatmap
    heatmap = attn.mean((0, 1, 2))
    mean, std = heatmap.mean(), heatmap.std()
    lower, upper = mean - 3 * std, mean + 3 * std
    heatmap = torch.clamp(heatmap, min=lower.item(), max=upper.item())
    heatmap = ((heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())) * alpha
    return torch.exp(heatmap)


def gift_authors_boost(attn_weights, gift_configs):
    """transformers-4.50.0/src/transformers/models/llama/modeling_llama.py, eager_attention_forward: the GIFT block,
    in place on attn_weights [1, H, q, kv] (its last row)."""
    vision_start_idx, vision_end_idx = gift_configs["vision_start_idx"], gift_configs["vision_end_idx"]
    query_start_idx, query_end_idx = gift_configs["query_start_idx"], gift_configs["query_end_idx"]
    vision_attn = attn_weights[0, :, -1, vision_start_idx:vision_end_idx + 1]
    query_attn = attn_weights[0, :, -1, query_start_idx:query_end_idx + 1]
    vision_scores = vision_attn.sum(dim=-1)
    num_heads_to_select = attn_weights.size(1) // 2
    selected_heads_vision = torch.topk(vision_scores, num_heads_to_select).indices
    selected_vision_attn = vision_attn[selected_heads_vision]
    original_vision_attn = selected_vision_attn.sum()
    selected_vision_attn *= gift_configs["visual_saliency_map"]
    enhanced_vision_attn = selected_vision_attn.sum()
    query_scale = enhanced_vision_attn / original_vision_attn
    vision_attn[selected_heads_vision] = selected_vision_attn
    query_scores = query_attn.sum(dim=-1)
    selected_heads_query = torch.topk(query_scores, num_heads_to_select).indices
    query_attn[selected_heads_query] *= query_scale
    attn_weights /= attn_weights.sum(dim=-1, keepdim=True)
    return attn_weights


def gift_token_indices(image_positions, length, query_start=3, query_end=6):
    """inference.py, get_token_indices (LLaVA: query span from the last image token + 3 to len - 6)."""
    return {"vision_start_idx": int(image_positions[0]), "vision_end_idx": int(image_positions[-1]),
            "query_start_idx": int(image_positions[-1]) + query_start, "query_end_idx": length - query_end}


@pytest.mark.parametrize("seed", range(5))
def test_gift_saliency_and_boost_equal_the_authors_on_random_attention(seed):
    generator = torch.Generator().manual_seed(seed)
    heads, length = 8, 40
    image = torch.zeros(length, dtype=torch.bool)
    image[5:21] = True
    probs = torch.rand(heads, length, length, generator=generator, dtype=torch.float64).tril().softmax(-1)
    indices = gift_token_indices(image.nonzero().flatten(), length)
    selected = [0, 2, 3, 7, 8, 11]  # content-word rows, relative to the span's start
    expected = gift_authors_heatmap([probs[None]], indices, selected, [0], 5.0)
    rows = torch.zeros(length, dtype=torch.bool)
    rows[torch.tensor(selected) + indices["query_start_idx"]] = True
    saliency = code_saliency(probs, rows, image, heads // 2)
    torch.testing.assert_close(torch.exp(5.0 * saliency), expected)

    query = torch.zeros(length, dtype=torch.bool)
    query[indices["query_start_idx"]:indices["query_end_idx"] + 1] = True
    row = torch.rand(1, heads, 1, length, generator=generator, dtype=torch.float64).softmax(-1)
    authors = gift_authors_boost(row.clone(), {**indices, "visual_saliency_map": expected})
    boost = torch.ones(length, dtype=torch.float64)
    boost[image] = expected
    ours = GIFT()._code_boost(image.view(1, 1, 1, -1), query.view(1, 1, 1, -1), boost.view(1, 1, 1, -1))(row)
    torch.testing.assert_close(ours, authors)
    assert not torch.allclose(ours, row)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gift_generate_equals_the_authors_code(family, tmp_path):
    """generate() under `gift` (its code variant, the default) equals a dense forward that applies the authors'
    saliency (layer 11 of 32 -> 1 of 4) and boost (12..22 -> 2..3) per sample; the content rows are the library's
    (the authors tag words with spaCy: see heads/gift.py)."""
    model, processor = tiny_model(family)
    processor.tokenizer.save_pretrained(tmp_path)
    ph = image_placeholder(processor)
    questions = ["Is there a red cat on the table near the door?",
                 "How many green birds are sitting on the old wooden fence today?"]

    def batch_fn(processor):
        return tiny_batch(processor, [(f"USER: {ph}\n{q} ASSISTANT:", [tiny_image(i)]) for i, q in enumerate(questions)])

    model, batch, out, plain, _, _ = run_wrapped(family, f"gift:tokenizer={tmp_path}", batch_fn=batch_fn)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    length = batch["input_ids"].shape[1]
    configs = []
    for b in range(p.batch):
        indices = gift_token_indices(p.visual[b].nonzero().flatten(), length)
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][b].tolist())
        content = content_tokens(tokens)
        selected = [i - indices["query_start_idx"]
                    for i in range(indices["query_start_idx"], indices["query_end_idx"] + 1) if content[i]]
        configs.append({**indices, "selected": selected})

    def observe(probs):
        for b, config in enumerate(configs):
            config["visual_saliency_map"] = gift_authors_heatmap(
                [probs[b:b + 1, :, :length, :length]], config, config["selected"], [0], 5.0)
        return probs

    def boost(probs):
        probs = probs.clone()
        for b, config in enumerate(configs):
            for t in p.predicting[b].nonzero().flatten().tolist():
                probs[b:b + 1, :, t:t + 1] = gift_authors_boost(probs[b:b + 1, :, t:t + 1].clone(), config)
        return probs

    reference, _ = reference_logits(model, batch, out, probs={1: observe, 2: boost, 3: boost})
    assert all(config["selected"] for config in configs)
    assert_matches(out, reference, plain)


# ---- DART: github.com/ZichenWen1/DART -------------------------------------------------------------------------------
def dart_authors_retained(DART_config, last_layer_state, any_states, text_length=None):
    """The author's last commit (5a19452, read from the fork xqy1111111/DART),
    llava/model/language_model/modeling_llama_self.py: LlamaModel.get_retained_image_token. One change: the pivots are
    visited in sorted order (`sorted(indices_set)` for `list(indices_set)`, CPython's set order; the library's
    documented order)."""
    image_token_start_index = DART_config['image_token_start_index']
    image_token_length = DART_config['image_token_length']
    MAX_NUM_TRUNCTION = DART_config['max_num_trunction']
    pivot_image_token = DART_config['pivot_image_token']
    pivot_text_token = DART_config['pivot_text_token']
    reduction_ratio = DART_config['reduction_ratio']
    TOKEN_TOPK = math.ceil((MAX_NUM_TRUNCTION if MAX_NUM_TRUNCTION is not None else (image_token_length * (1 - reduction_ratio))) // (pivot_image_token + pivot_text_token))
    device = last_layer_state.device
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in sorted(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)
    return retained_image_tokens_index


def one_image_each(processor):
    """A left-padded batch of two one-image prompts (the authors' code takes one contiguous image span)."""
    ph = image_placeholder(processor)
    return tiny_batch(processor, [(f"what is {ph} this thing here", [tiny_image(0)]),
                                  (f"a much longer prompt with {ph} and a question to ask", [tiny_image(1)])])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("count, truncation", [("ratio", None), ("code", 8)])
def test_dart_kept_sets_equal_the_authors_code(family, count, truncation):
    layer, ratio = 2, 0.5
    model, processor = tiny_model(family)
    batch = one_image_each(processor)
    with masked_reference(model, {}) as recorded, torch.no_grad():
        hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[layer]
        keys = recorded[layer - 1]["keys"]  # [B, Hkv, N, d]
        states = model.model.language_model.norm(hidden)
    spec = f"dart:layer={layer},ratio={ratio},count={count}" + (f",truncation={truncation}" if truncation else "")
    ve.wrap(model, spec)
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    for b in range(hidden.shape[0]):
        image = run.layout.visual[b].nonzero().flatten()
        config = {"image_token_start_index": int(image[0]), "image_token_length": len(image),
                  "max_num_trunction": truncation, "reduction_ratio": ratio,
                  "pivot_image_token": 4, "pivot_text_token": 4}
        expected = dart_authors_retained(config, states[b:b + 1].float(), keys[b:b + 1].float())
        kept = [p for p in run.layer_positions[layer][b].tolist() if p >= 0 and bool(run.layout.visual[b, p])]
        assert kept == sorted(expected.tolist())
        assert len(image) > len(kept) > 4


def test_dart_code_count_keeps_132_of_576_at_ratio_0778():
    """The authors' scripts (ratio 0.778, max_num_trunction 128) keep 4 image pivots + 8 x 16; the paper's count
    keeps 4 + 8 x 15 = 124."""
    from vlm_efficient.token_ops.dart import DART

    generator = torch.Generator().manual_seed(0)
    n = 576 + 20
    visual = torch.zeros(1, n, dtype=torch.bool)
    visual[0, 10:586] = True
    question = torch.zeros_like(visual)
    question[0, 586:] = True
    states = torch.nn.functional.normalize(torch.randn(1, n, 32, generator=generator), dim=-1)
    key_norm = torch.rand(1, n, generator=generator)
    for count, expected in (("code", 132), ("ratio", 124)):
        dart = DART(count=count)
        assert int(dart.kept_image_rows(key_norm, states, visual, question).sum()) == expected


# ---- ACT: github.com/GATECH-EIC/ACT ---------------------------------------------------------------------------------
def act_authors_process_cal(attention_map, HEAD_NUM, beta=0.4, threshod=0.1):
    """models/llama_modelling_aug.py: atten_process_cal (batch of one; BETA / THRES / HEAD_NUM from the environment
    there)."""
    modified_head = attention_map[0][HEAD_NUM]
    device = modified_head.device
    shape = modified_head.shape[0]
    indices = torch.nonzero(torch.where(torch.sum(modified_head, dim=0) / torch.arange(shape, 0, -1).to(device) > threshod, 1, 0))
    indices = indices[1:]
    copied_attention_map = copy.deepcopy(modified_head.detach())
    available_weights = modified_head[:, indices].sum(dim=1) * (1 - beta)
    modified_head[:, indices] *= beta
    copied_attention_map[1:, indices] *= 0
    ratios = copied_attention_map / torch.sum(copied_attention_map, dim=1, keepdim=True).to(copied_attention_map.dtype)
    modified_head = modified_head + available_weights * ratios
    modified_head[0, 0] = 1
    attention_map[0][HEAD_NUM] = modified_head
    return attention_map


def one_prompt(processor):
    ph = image_placeholder(processor)
    return tiny_batch(processor, [(f"a much longer prompt with {ph} and a question to ask", [tiny_image(1)])])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_act_one_head_equals_the_authors_calibration(family):
    """One forward (the public code calibrates the prompt's forward) with one head calibrated, as the search does
    (scripts/calibration.sh: CALIBRATION=1, LAYER_NUM, HEAD_NUM)."""
    model, processor = tiny_model(family)
    batch = one_prompt(processor)
    with torch.no_grad():
        plain = model(**batch).logits
    ve.wrap(model, "act:heads=2.1")
    with torch.no_grad():
        ours = model(**batch).logits
    ve.unwrap(model)
    probs = {2: lambda p: act_authors_process_cal(p.clone(), 1)}
    with dense(model, probs=probs), torch.no_grad():
        reference = model(**batch, use_cache=False).logits
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3


def test_act_search_keeps_the_heads_that_raise_accuracy():
    """search_heads against the procedure spelled out: every head of layers 2..L-2 calibrated alone, each sample
    scored alone (no padding), kept where the accuracy beats the uncalibrated model's."""
    from vlm_efficient.evals.act_search import search_heads

    model, processor = tiny_model("llava")
    ph = image_placeholder(processor)
    prompts = [(f"what is {ph} this thing {i * 'here '}", [tiny_image(i)]) for i in range(6)]
    choices = torch.tensor([[5, 9, 17, 30, 41, 60]]).expand(len(prompts), -1)
    with torch.no_grad():  # labels: the plain model's second choice, so that calibrations can win questions
        last = torch.cat([model(**tiny_batch(processor, [p])).logits[:, -1] for p in prompts])
    labels = last.gather(1, choices).argsort(1, descending=True)[:, 1]
    batches = [(dict(tiny_batch(processor, prompts[:3])), choices[:3], labels[:3]),
               (dict(tiny_batch(processor, prompts[3:])), choices[3:], labels[3:])]
    heads, scores = search_heads(model, batches)

    def accuracy(spec):
        if spec:
            ve.wrap(model, spec)
        with torch.no_grad():
            right = sum(int(model(**tiny_batch(processor, [p])).logits[0, -1][choices[i]].argmax() == labels[i])
                        for i, p in enumerate(prompts))
        if spec:
            ve.unwrap(model)
        return right / len(prompts)

    expected = {"base": accuracy("")} | {f"2.{h}": accuracy(f"act:heads=2.{h}") for h in range(4)}
    assert scores == pytest.approx(expected), scores
    assert heads == "/".join(h for h in expected if h != "base" and expected[h] > expected["base"])


# ---- pruning inside the LLM: FastV, PyramidDrop -------------------------------------------------------------------
def kept_image_positions(model, batch, spec, layer):
    """Per sample, the image positions the wrapped model keeps from `layer` on (one prefill)."""
    ve.wrap(model, spec)
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    return [[p for p in run.layer_positions[layer][b].tolist() if p >= 0 and bool(run.layout.visual[b, p])]
            for b in range(batch["input_ids"].shape[0])]


def recorded_probs(model, batch):
    """Each layer's attention probabilities [B, H, N, N] of the plain model (dense reference attention)."""
    with masked_reference(model, {}) as recorded, torch.no_grad():
        model(**batch, use_cache=False)
    return {layer: entry["probs"] for layer, entry in recorded.items()}


def image_span(model, batch, b):
    image = (batch["input_ids"][b] == ve.get_adapter(model).image_token_id(model)).nonzero().flatten()
    return int(image[0]), len(image)


def fastv_authors_keep(last_layer_attention, SYS_LENGTH, IMAGE_TOKEN_LENGTH, ATTENTION_RANK, seq_length_with_past):
    """github.com/pkunlp-icler/FastV, src/transformers/src/transformers/models/llama/modeling_llama.py, LlamaModel
    .forward, the FASTV_INPLACE branch at layer K (batch of one; layer_outputs[1] of layer K-1)."""
    device = last_layer_attention.device
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[SYS_LENGTH:SYS_LENGTH+IMAGE_TOKEN_LENGTH]
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(ATTENTION_RANK).indices + SYS_LENGTH
    keep_indexs = torch.cat((torch.arange(SYS_LENGTH, device=device), top_attention_rank_index, torch.arange(SYS_LENGTH+IMAGE_TOKEN_LENGTH, seq_length_with_past, device=device)))
    keep_indexs = keep_indexs.sort().values
    return keep_indexs


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_kept_sets_equal_the_authors_code(family):
    layer, ratio = 2, 0.5
    model, processor = tiny_model(family)
    batch = one_image_each(processor)
    probs = recorded_probs(model, batch)
    kept = kept_image_positions(model, batch, f"fastv:layer={layer},ratio={ratio}", layer)
    for b in range(len(kept)):
        start, count = image_span(model, batch, b)
        rank = int(count * (1 - ratio) + 0.5)  # ATTENTION_RANK, given to the public code directly
        keep = fastv_authors_keep(probs[layer - 1][b:b + 1], start, count, rank, batch["input_ids"].shape[1])
        assert kept[b] == [p for p in keep.tolist() if start <= p < start + count]


def pdrop_authors_rank(attn_weights, image_index, image_tokens, keep_length):
    """github.com/Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py, pdrop_rank_drop (inference branch),
    from `attn_weights` [H, 1, seq] = the softmax of the last instruction token's row in the boundary layer, computed
    there from the layer's input_layernorm, q_proj / k_proj and rotary (the dense reference's probabilities here)."""
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, image_index:image_index+image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    top_rank_index = attention_avg_text.topk(keep_length).indices
    top_rank_index = top_rank_index + image_index
    top_rank_index = top_rank_index.sort().values
    return top_rank_index


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pdrop_first_stage_equals_the_authors_code(family):
    """The first boundary (nothing dropped before it, so the authors' renumbered positions are the original ones):
    keep_length = int(n x ratio_list[1]) of the image tokens by the last instruction token's attention."""
    layer, ratio = 2, 0.5
    model, processor = tiny_model(family)
    batch = one_image_each(processor)
    probs = recorded_probs(model, batch)
    kept = kept_image_positions(model, batch, f"pdrop:layers={layer},ratio={ratio}", layer)
    for b in range(len(kept)):
        start, count = image_span(model, batch, b)
        expected = pdrop_authors_rank(probs[layer][b][:, -1:], start, count, int(count * ratio))
        assert kept[b] == expected.tolist()


# ---- pruning before the LLM: FasterVLM, VisionZip -----------------------------------------------------------------
def fastervlm_authors_masks(image_attentions, visual_token_num):
    """github.com/Theia-4869/FasterVLM, llava/model/llava_arch.py, encode_images, from the [CLS] rows of the feature
    layer's attention (clip_encoder.py feature_select, 'patch': attentions[:, :, 0, 1:])."""
    B, N = image_attentions.shape[0], image_attentions.shape[-1]
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=image_attentions.device)  # (B, N)
    index_masks.scatter_(1, token_indices, True)  # (B, N)
    return index_masks


@pytest.mark.parametrize("seed", range(3))
def test_fastervlm_selection_equals_the_authors_code(seed):
    from vlm_efficient.token_ops.fastervlm import FasterVLM

    generator = torch.Generator().manual_seed(seed)
    attentions = torch.rand(1, 16, 577, generator=generator).softmax(-1)[..., 1:][:, :, None].expand(-1, -1, 1, -1)
    method = FasterVLM(ratio=0.778)
    keep, merged = method.choose(attentions[0, :, 0].mean(0), None, None)  # the library's score: the head mean
    expected = fastervlm_authors_masks(attentions[:, :, 0], int(576 * (1 - 0.778) + 0.5))
    assert merged is None and torch.equal(keep, expected[0])


def visionzip_authors(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """github.com/dvlab-research/VisionZip, visionzip/clip_encoder.py, CLIPVisionTower_VisionZip.forward (batched
    branch): -> (tokens [B, 1 + dominant + contextual, C] in the authors' order, the kept indices incl. CLS 0)."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx+1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype, device=topk_indices.device), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num +1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1], device=metric_normalized.device), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype, device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1], device=hidden_states_filtered.device), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return hidden_states_save, all_indices


@pytest.mark.parametrize("seed", range(3))
def test_visionzip_selection_and_merge_equal_the_authors_code(seed):
    """Dominant patches by summed [CLS] attention, contextual targets every (rest // contextual)-th remaining patch,
    each target + the mean of the patches whose normalised metric is closest: the same patch tokens and values. The
    authors' CLS token (always first) has no placeholder in an HF LLaVA prompt; the order of the authors' output
    (CLS, dominant, then contextual) is the order the LLM sees there."""
    from vlm_efficient.token_ops.visionzip import VisionZip

    generator = torch.Generator().manual_seed(seed)
    heads, n, width, dominant, contextual = 4, 64, 8, 12, 6
    attn = torch.rand(1, heads, n + 1, n + 1, generator=generator).softmax(-1)
    hidden = torch.randn(1, n + 1, width, generator=generator)
    metric = torch.randn(1, n + 1, width, generator=generator)
    tokens, indices = visionzip_authors(attn, hidden, metric, dominant, contextual)

    method = VisionZip()
    method.counts = lambda total: (dominant, contextual)
    keep, merged = method.choose_tiles(attn[:, :, 0, 1:].sum(1), metric[:, 1:], hidden[:, 1:])
    dominant_set = set((indices[0, 1:] - 1).tolist())
    kept = keep[0].nonzero().flatten().tolist()
    contextual_kept = [p for p in kept if p not in dominant_set]
    assert dominant_set < set(kept) and len(contextual_kept) == contextual
    ours = torch.cat([hidden[0, :1], merged[0, sorted(dominant_set)], merged[0, contextual_kept]])
    torch.testing.assert_close(ours, tokens[0])


# ---- logit edits: PAI, ClearSight / VAF ----------------------------------------------------------------------------
def pai_authors_edit(attn_weights, img_start_idx, img_end_idx, alpha):
    """github.com/LALBJ/PAI, attention.py, llama_new_forward: "PAI's modification" (use_attn, not use_cfg), on the
    scaled logits of the forward's last row."""
    attn_weights[:, :, -1, img_start_idx:img_end_idx] = (
        attn_weights[:, :, -1, img_start_idx:img_end_idx].abs() * alpha
        + attn_weights[:, :, -1, img_start_idx:img_end_idx]
    )
    return attn_weights


def last_rows(edit, p, spans):
    """Apply `edit(x [1, H, t + 1, kv], span)` as at each forward's last row: the last prompt row and each generated
    row of the dense forward, sample by sample."""
    def apply(x):
        x = x.clone()
        for b in range(p.batch):
            for t in p.predicting[b].nonzero().flatten().tolist():
                x[b:b + 1, :, t:t + 1] = edit(x[b:b + 1, :, t:t + 1].clone(), *spans[b])
        return x

    return apply


def spans_of(model, batch):
    return [image_span(model, batch, b) for b in range(batch["input_ids"].shape[0])]


def one_image_each_fn(processor):
    return one_image_each(processor)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pai_equals_the_authors_code(family):
    """chair_eval.py's defaults: layers 2..31 of 32 (start_layer 2, end_layer 32: here 2..3 of 4), alpha 0.2."""
    model, batch, out, plain, _, _ = run_wrapped(family, "pai:alpha=0.2", batch_fn=one_image_each_fn)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    edit = last_rows(lambda x, start, count: pai_authors_edit(x, start, start + count, 0.2), p, spans_of(model, batch))
    reference, _ = reference_logits(model, batch, out, logits={2: edit, 3: edit})
    assert_matches(out, reference, plain)


def vaf_authors_edit(attn_weights, SYS_LEN, IMG_LEN, enh_para=1.15, sup_para=0.95):
    """github.com/ustc-hyin/ClearSight, visaug/inference/AttnAdapter.py, AttnAdapter.forward ("enhance visual
    information"; SYS_LEN = 35 and IMG_LEN = 576 there, LLaVA-1.5's prompt)."""
    q_len = attn_weights.shape[2]
    if q_len > SYS_LEN+IMG_LEN:
        attn_weights[:, :, SYS_LEN+IMG_LEN:, SYS_LEN:SYS_LEN+IMG_LEN] = enh_para * attn_weights[:, :, SYS_LEN+IMG_LEN:, SYS_LEN:SYS_LEN+IMG_LEN]
        attn_weights[:, :, SYS_LEN+IMG_LEN:, :SYS_LEN] = sup_para * attn_weights[:, :, SYS_LEN+IMG_LEN:, :SYS_LEN]
    else:
        attn_weights[:, :, :, SYS_LEN:SYS_LEN+IMG_LEN] = enh_para * attn_weights[:, :, :, SYS_LEN:SYS_LEN+IMG_LEN]
        attn_weights[:, :, :, :SYS_LEN] = sup_para * attn_weights[:, :, :, :SYS_LEN]
    return attn_weights


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vaf_equals_the_authors_code(family):
    """infer_pope.py: the adapter replaces layers 9..14 of 32 (here 1..2 of 4). The dense forward holds the prompt
    and the generated rows at once: the prefill branch (rows after the image) covers the decoding rows too."""
    model, batch, out, plain, _, _ = run_wrapped(family, "vaf", batch_fn=one_image_each_fn)
    spans = spans_of(model, batch)

    def edit(scores):
        scores = scores.clone()
        for b, (start, count) in enumerate(spans):
            scores[b:b + 1] = vaf_authors_edit(scores[b:b + 1].clone(), start, count)
        return scores

    reference, _ = reference_logits(model, batch, out, logits={1: edit, 2: edit})
    assert_matches(out, reference, plain)


# ---- AdaptVis: github.com/shiqichen17/AdaptVis ----------------------------------------------------------------------
def adaptvis_authors_edit(attn_weights, keys, weight, caption_length=None):
    """model_zoo/llama/modeling_llama_add_attn.py, LlamaAttention.forward, "ATTENTION" block (before the mask; `keys`
    [1, N] marks the image tokens: llava15.py, torch.where(input_id == 32001, 1, 0))."""
    if attn_weights.size()[2] == attn_weights.size()[3]:
        true_indices = torch.where(keys)[True]
        start_idx = true_indices[0].item()
        end_idx = true_indices[-1].item()
        square_size = end_idx - start_idx + 1
        mask = torch.zeros((attn_weights.size()[2], attn_weights.size()[2]), dtype=torch.bool)
        if caption_length:
            mask[-len(caption_length[0]):, start_idx:start_idx + square_size+1] = True
        else:
            mask[-1, start_idx:start_idx + square_size] = True
        attn_weights[:, :, mask] *= weight
    return attn_weights


def adaptvis_authors_weight(first_scores, threshold, weight1, weight2):
    """model_zoo/llava15.py, get_out_scores_wh_batched, method 'adapt_vis': the first generated token's largest
    probability, rounded to 2 decimals, below `threshold` -> weight1, else weight2."""
    uncertainty = np.round(float(max(torch.nn.functional.softmax(first_scores, dim=-1)[0])), 2)
    return weight1 if uncertainty < threshold else weight2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_adaptvis_prompt_forward_equals_the_authors_code(family):
    """The public code edits the square (prompt) forward only; both weights are exercised (the threshold lies between
    the two samples' confidences)."""
    model, processor = tiny_model(family)
    batch = one_image_each(processor)
    with torch.no_grad():
        last = model(**batch).logits[:, -1].float()
    confidence = sorted(float(np.round(float(c), 2)) for c in last.softmax(-1).amax(-1))
    assert confidence[0] < confidence[1]
    threshold = (confidence[0] + confidence[1]) / 2
    ve.wrap(model, f"adaptvis:threshold={threshold}")
    with torch.no_grad():
        ours = model(**batch).logits[:, -1]
    ve.unwrap(model)
    image_id = ve.get_adapter(model).image_token_id(model)
    weights = [adaptvis_authors_weight(last[b:b + 1], threshold, 0.5, 1.5) for b in range(2)]
    assert sorted(weights) == [0.5, 1.5]

    def edit(scores):
        scores = scores.clone()
        for b in range(2):
            keys = (batch["input_ids"][b:b + 1] == image_id).long()
            scores[b:b + 1] = adaptvis_authors_edit(scores[b:b + 1].clone(), keys, weights[b])
        return scores

    with dense(model, logits={layer: edit for layer in range(4)}), torch.no_grad():
        reference = model(**batch, use_cache=False).logits[:, -1]
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-4, rtol=1e-4)
    assert (ours - last).abs().max() > 1e-3


# ---- PAINT: github.com/hasanar1f/llava-hallunication-fix ------------------------------------------------------------
def paint_authors_get_top_ratio(attn):
    """modPAI/llava/model/multimodal_encoder/clip_encoder.py, get_top_ratio."""
    attn_np = attn.cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]
    ratio = len(outlier_indices) / len(attn_np)
    return ratio


def paint_authors_groups(top_attn, bottom_attn, num_vision_tokens=576, local_token_ratio=0.25):
    """The same file, update_modpai_alpha, from the [CLS] rows summed over heads (top_attn: ViT layer 0, bottom_attn:
    the second-to-last layer); spatial_attention_top_tokens keeps int(n x 0) = 0 tokens, left out."""
    _, top_tokens = torch.topk(top_attn, int(num_vision_tokens * local_token_ratio), largest=True)
    _, bottom_tokens = torch.topk(bottom_attn, int(num_vision_tokens * paint_authors_get_top_ratio(bottom_attn)), largest=True)
    top_tokens_set = set(top_tokens.tolist())
    bottom_tokens_set = set(bottom_tokens.tolist())
    final_top_tokens = list(top_tokens_set - bottom_tokens_set)
    return set(final_top_tokens), bottom_tokens_set


@pytest.mark.parametrize("seed", range(5))
def test_paint_groups_equal_the_authors_code(seed):
    from vlm_efficient.heads.paint import token_groups

    generator = torch.Generator().manual_seed(seed)
    first = torch.rand(1, 576, generator=generator, dtype=torch.float64)
    late = torch.rand(1, 576, generator=generator, dtype=torch.float64) ** 8  # heavy tail: outliers exist
    top, outliers = token_groups(first, late, 0.25)
    expected_top, expected_outliers = paint_authors_groups(first[0], late[0])
    assert expected_outliers and expected_top
    assert set(outliers[0].nonzero().flatten().tolist()) == expected_outliers
    assert set(top[0].nonzero().flatten().tolist()) == expected_top


# ---- OCR-head sink: github.com/baekingeol/OCR_Head ------------------------------------------------------------------
def ocr_authors_redistribute(attn, beta=0.2, eps=1e-9):
    """utils/models/qwenvl2_sink.py, redistribute_method_beta (called with beta = 0.4 on each chosen head)."""
    if attn.size(-1) <= 1:
        return attn
    sink = attn[..., :1]
    rest = attn[..., 1:]
    keep_sink = sink * beta
    redistribute = sink - keep_sink
    rest_sum = rest.sum(dim=-1, keepdim=True)
    weight = rest / (rest_sum + eps)
    weight = torch.where(rest_sum > eps, weight, torch.full_like(weight, 1.0 / weight.size(-1)))
    rest = rest + redistribute * weight
    new_attn = torch.cat([keep_sink, rest], dim=-1)
    return new_attn


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_ocr_sink_equals_the_authors_code(family):
    """One unpadded prompt (the public code's token 0 is the first token), generate(); every row of the chosen heads,
    prompt and decoding rows alike, except row 0: it sees no key but the sink, and the public code then spreads 1 - beta
    uniformly over the row's masked keys (future tokens: a causal leak); the library leaves that row alone
    (heads/ocr_sink.py)."""
    model, batch, out, plain, _, _ = run_wrapped(family, "ocr_sink:heads=2.1/3.0", batch_fn=one_prompt)

    def edit(heads):
        def apply(probs):
            probs = probs.clone()
            for head in heads:
                probs[:, head, 1:] = ocr_authors_redistribute(probs[:, head, 1:].clone(), beta=0.4)
            return probs

        return apply

    reference, _ = reference_logits(model, batch, out, probs={2: edit([1]), 3: edit([0])})
    assert_matches(out, reference, plain)


# ---- VAR: github.com/seilk/VisAttnSink (variant=code) ---------------------------------------------------------------
def var_authors_sinks(hs, dim_sink, tau):
    """src/logic/logic.py, DimProspector.run_logic (with rmsnorm), batch of one: the sink token positions."""
    hidden_states = hs.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    rms_norm_hs = torch.abs(hidden_states * torch.rsqrt(variance + 1e-6))
    rms_values = torch.stack([rms_norm_hs[:, :, idx] for idx in dim_sink], dim=-1)
    max_rms_values = torch.max(rms_values, dim=-1)[0]
    return torch.nonzero(max_rms_values > tau)[:, 1]


def var_authors_fork(attn, sink_inds, im, pa, rho, summ):
    """The same file, HeadFork.run_logic: the (batch, head, query) coordinates of the image-centric rows."""
    vis_sink_inds = [i.unsqueeze(0) for i in sink_inds if im <= i < im+pa]
    if len(vis_sink_inds) > 0:
        vis_sink_inds = torch.cat(vis_sink_inds, dim=0)
        image_attn = attn[:, :, :, im:im+pa]
        portion = torch.sum(image_attn[:, :, :, vis_sink_inds-im], dim=-1) / torch.sum(image_attn + 1e-6, dim=-1)
        summation = torch.sum(image_attn, dim=-1)
        portion_condition = portion <= rho
        summation_condition = summation >= summ
        return torch.nonzero(portion_condition & summation_condition)
    return []


def var_authors_redist(attention_map, coord, indices, im, pa, p, prefill=True):
    """The same file, VARProcessor.attn_redist (the last layer is skipped by the caller: except_last_layer)."""
    if len(coord) > 0:
        model_head_num = attention_map.shape[1]
        for h in range(model_head_num):
            query_coord = coord[coord[:, 1]==h][:,2]
            query_coord = query_coord[im+pa<=query_coord] if prefill else query_coord
            bsz_coord = coord[coord[:, 1] == h][:,0][:len(query_coord)]
            head_coord = coord[coord[:, 1]==h][:,1][:len(query_coord)]
            if not query_coord.shape[0] or not head_coord.shape[0]:
                continue
            selected_attn_map = attention_map[bsz_coord, head_coord, query_coord, :].clone()
            indices = indices.to(selected_attn_map.device)
            vis_indices = indices[(im<=indices) & (indices<im+pa)]
            text_indices = indices[~torch.isin(indices, vis_indices)]
            copied_attention_map = copy.deepcopy(selected_attn_map.detach())
            selected_attn_map[:, text_indices] *= p
            selected_attn_map[:, vis_indices] *= p
            weight_budget_vis = copied_attention_map[:, vis_indices].sum(dim=1) * (1 - p)
            weight_budget_text = copied_attention_map[:, text_indices].sum(dim=1) * (1 - p)
            copied_attention_map[:, vis_indices] *= 0
            ratios_vis = copied_attention_map[:, im:im+pa] / copied_attention_map[:, im:im+pa].sum(dim=1, keepdim=True).to(selected_attn_map.dtype)
            selected_attn_map[:, im:im+pa] += (weight_budget_vis + weight_budget_text).view(-1,1) * ratios_vis
            attention_map[bsz_coord, head_coord, query_coord, :] = selected_attn_map
    return attention_map


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_var_code_variant_equals_the_authors_code(family):
    """generate() under var:variant=code with a fixed sink-dimension list (the authors' dim_sink) against a dense
    forward applying HeadFork + attn_redist in layer 2 (layers 2..L-2; the last is skipped), sinks from the prompt's
    hidden states entering the layer (DimProspector runs at prefill only). tau is low for a random model's scale."""
    dims, tau = [0, 1, 2, 3], 1.5
    model, batch, out, plain, _, _ = run_wrapped(
        family, f"var:variant=code,sink_dims={'/'.join(map(str, dims))},tau={tau}", batch_fn=one_prompt)
    im, pa = image_span(model, batch, 0)
    prompt = batch["input_ids"].shape[1]
    found = {}

    def edit(probs):
        sinks = var_authors_sinks(live_hidden(2)[:, :prompt], dims, tau)
        found["visual"] = [int(i) for i in sinks if im <= i < im + pa]
        coord = var_authors_fork(probs, sinks, im, pa, rho=0.5, summ=0.2)
        return var_authors_redist(probs.clone(), coord, sinks, im, pa, p=0.6)

    reference, _ = reference_logits(model, batch, out, probs={2: edit})
    assert found["visual"]
    assert_matches(out, reference, plain)


# ---- SparseVLM: github.com/Gumpest/SparseVLMs -----------------------------------------------------------------------
def sparsevlm_authors_raters(hidden_states, v_token_start, text_token_start):
    """llava/model/language_model/modelling_sparse_llama.py, LlamaModel.forward, "Select Text Raters" (on the LLM's
    input embeddings)."""
    v_t = hidden_states[:, v_token_start: text_token_start, :]
    t_t = hidden_states[:, text_token_start:, :]
    m_v_t = v_t @ t_t.transpose(1, 2)
    m_v_t = m_v_t.softmax(2).mean(1)
    return torch.where(m_v_t > m_v_t.mean())


def sparsevlm_authors_topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx,
                           sparse_token_list, layer_dict):
    """llava/model/language_model/score.py, attn_postprocess_topk (sparse_token_list = sparse_token_dict[RETAIN_TOKN]
    and layer_dict are module constants there)."""
    self_attn_weights = self_attn_weights.mean(1)
    t_token_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_token_idx, v_token_start: v_token_start+v_token_num]
    relation_vis_text = relation_vis_text.mean(1)
    relation_vis = relation_vis_text
    mask = torch.zeros_like(relation_vis, dtype=bool)
    _, indices = torch.topk(relation_vis, min(sparse_token_list[layer_dict[layer_idx]], v_token_num - 1), dim=1)
    mask[0][indices] = 1
    return mask


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sparsevlm_first_stage_equals_the_authors_code(family):
    """The public code's fixed counts (`keep=`), first sparse layer (nothing deleted before it, so positions agree),
    without recycling (the public code appends the merged tokens, the library writes them into their centres' rows)."""
    stages, keep = (1, 2), (0.5, 0.3)
    model, processor = tiny_model(family)
    batch = one_prompt(processor)
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    probs = recorded_probs(model, batch)
    spec = f"sparsevlm:layers={'/'.join(map(str, stages))},keep={'/'.join(map(str, keep))},recycle=0"
    kept = kept_image_positions(model, batch, spec, stages[0] + 1)[0]
    start, count = image_span(model, batch, 0)
    raters = sparsevlm_authors_raters(embeds.float(), start, start + count)
    counts = [int(k * count + 0.5) for k in keep]
    mask = sparsevlm_authors_topk(probs[stages[0]], start, count, start + count, raters, stages[0], counts,
                                  {layer: i for i, layer in enumerate(stages)})
    assert kept == (mask[0].nonzero().flatten() + start).tolist()
    assert 0 < len(kept) < count


# ---- DivPrune: github.com/vbdi/divprune -----------------------------------------------------------------------------
def divprune_authors(visual_feature_vectors, image_feature_length, cosine_matrix=None, threshold_ratio=0.1):
    """LLaVA/llava/model/llava_arch.py, LlavaMetaForCausalLM.DivPrune with pairwise_cosine_similarity."""
    def pairwise_cosine_similarity(matrix):
        norm_matrix = matrix / matrix.norm(dim=1, keepdim=True)
        cosine_similarity = torch.mm(norm_matrix, norm_matrix.t())
        return cosine_similarity

    threshold_terms = int(round(threshold_ratio*image_feature_length))
    if cosine_matrix is None:
        cosine_matrix = 1.0 - (pairwise_cosine_similarity(visual_feature_vectors))
    s = torch.empty(threshold_terms, dtype=torch.long, device=visual_feature_vectors.device)
    for i in range(threshold_terms):
        if i==0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s,0,torch.arange(0,i,device=cosine_matrix.device)))
        if i==0:
            scores = torch.topk(m2, 2,dim=0,largest=False).values[1,:]
        else:
            scores = torch.min(m2, dim=0).values
        phrase_to_add_idx = torch.argmax(scores)
        s[i] = phrase_to_add_idx
    return s, cosine_matrix


@pytest.mark.parametrize("seed", range(3))
def test_divprune_picks_equal_the_authors_code(seed):
    """The scripts' SUBSET_RATIO = 0.098 (`ratio=0.902`): the same 56 of 576 tokens, picked in the same order."""
    from vlm_efficient.selection import keep_count
    from vlm_efficient.token_ops.divprune import max_min_diverse

    features = torch.randn(576, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected, _ = divprune_authors(features, 576, threshold_ratio=0.098)
    count = int(keep_count(torch.tensor([576]), 0.902))
    assert count == len(expected) == 56
    assert max_min_diverse(features, count).tolist() == expected.tolist()


# ---- positions after pruning before the LLM -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["fastervlm:ratio=0.5", "divprune:ratio=0.5", "visionzip:ratio=0.5"])
def test_renumbered_positions_feed_the_kept_tokens_as_the_authors_code_does(spec):
    """positions=renumber: generate() equals the plain text model fed only the kept (and merged) tokens with
    contiguous positions, the prompt's and the generated ones (as the authors' code feeds a pruned prompt); the
    default, original positions, differs."""
    from test_engine import greedy

    model, processor = tiny_model("llava")
    batch = one_prompt(processor)
    text_model = model.model.language_model
    runs = {}
    for positions in ("original", "renumber"):  # the embeddings captured last: renumber's (VisionZip reorders)
        captured = {}
        ve.wrap(model, f"{spec},positions={positions}")
        def capture(module, args, kwargs):
            captured.setdefault("embeds", kwargs["inputs_embeds"])

        handle = text_model.register_forward_pre_hook(capture, with_kwargs=True)
        out = greedy(model, batch)
        runs[positions] = torch.stack(out.logits, 1), out.sequences
        handle.remove()
        ve.unwrap(model)
    embeds = captured["embeds"]  # what the engine hands the text model: the kept rows, merged where merged
    logits, sequences = runs["renumber"]
    generated = sequences[:, batch["input_ids"].shape[1]:-1]
    full = torch.cat([embeds, model.get_input_embeddings()(generated)], 1)
    with torch.no_grad():
        hidden = text_model(inputs_embeds=full, position_ids=torch.arange(full.shape[1])[None]).last_hidden_state
        reference = model.lm_head(hidden)[:, embeds.shape[1] - 1:]
    assert embeds.shape[1] < batch["input_ids"].shape[1]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert (runs["original"][0][:, 0] - logits[:, 0]).abs().max() > 1e-4


def test_renumbered_positions_are_refused_for_qwen():
    model, _ = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="3-D"):
        ve.wrap(model, "divprune:positions=renumber")
    with pytest.raises(ValueError, match="original or renumber"):
        ve.wrap(tiny_model("llava")[0], "visionzip:positions=other")


def visionzip_authors_tower_inputs(model, pixel_values):
    """What CLIPVisionTower_VisionZip.forward reads (github.com/dvlab-research/VisionZip, visionzip/clip_encoder.py,
    visionzip/utils.py: CLIPAttention_forward returns raw_key_states.mean(1) as the layer's `metric`): the feature
    layer's attention weights [B, H, n, n], its output hidden states [B, n, C], its head-averaged keys [B, n, d]."""
    tower = model.model.vision_tower
    with torch.no_grad():
        states = tower(pixel_values, output_hidden_states=True).hidden_states
    layer = getattr(tower, "vision_model", tower).encoder.layers[model.config.vision_feature_layer]
    attention = layer.self_attn
    x = layer.layer_norm1(states[model.config.vision_feature_layer - 1])
    heads = attention.num_heads
    q = attention.q_proj(x).view(*x.shape[:2], heads, -1).transpose(1, 2)
    k = attention.k_proj(x).view(*x.shape[:2], heads, -1).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) * attention.scale).softmax(-1)
    return weights.detach(), states[model.config.vision_feature_layer], k.mean(1).detach()


def test_visionzip_renumber_feeds_the_authors_order_and_positions():
    """positions=renumber on LLaVA: generate() equals the authors' pipeline written out - their tower's tokens
    (visionzip_authors: CLS, dominant, then contextual), the projector, and llava_arch.py's
    prepare_inputs_labels_for_multimodal_visionzip (text, image features in that order, text; positions 0..n-1) -
    less the authors' CLS token, which an HF LLaVA prompt has no placeholder for. Two prompts of different lengths
    (left padding), each against its own reference (rotary positions are relative: the padding's offset is no
    difference). Prompt order (positions=original) differs."""
    from test_engine import greedy
    from vlm_efficient.token_ops.visionzip import VisionZip

    model, processor = tiny_model("llava")
    ph = image_placeholder(processor)
    batch = tiny_batch(processor, [(f"{ph} describe it", [tiny_image(3)]),
                                   (f"a much longer prompt with {ph} and a question to ask", [tiny_image(1)])])
    ratio = 0.25
    runs = {}
    for positions in ("renumber", "original"):
        ve.wrap(model, f"visionzip:ratio={ratio},positions={positions}")
        out = greedy(model, batch)
        runs[positions] = torch.stack(out.logits, 1), out.sequences
        ve.unwrap(model)
    logits, sequences = runs["renumber"]
    weights, states, metric = visionzip_authors_tower_inputs(model, batch["pixel_values"])
    method = VisionZip(ratio=ratio)
    method.share = 10 / 64  # bind's share on CLIP towers
    dominant, contextual = method.counts(states.shape[1] - 1)
    assert contextual >= 2 and dominant >= 2  # an order to get wrong
    tokens, _ = visionzip_authors(weights, states, metric, dominant, contextual)
    with torch.no_grad():
        features = model.model.multi_modal_projector(tokens[:, 1:])  # the authors' CLS token dropped
    image_id = ve.get_adapter(model).image_token_id(model)
    embed = model.get_input_embeddings()
    prompt_length = batch["input_ids"].shape[1]
    for b in range(2):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        start = int((ids == image_id).nonzero()[0])
        end = start + int((ids == image_id).sum())
        generated = sequences[b, prompt_length:-1]
        with torch.no_grad():
            full = torch.cat([embed(ids[:start]), features[b], embed(ids[end:]), embed(generated)])[None]
            hidden = model.model.language_model(inputs_embeds=full,
                                                position_ids=torch.arange(full.shape[1])[None]).last_hidden_state
            reference = model.lm_head(hidden)[0, full.shape[1] - generated.shape[0] - 1:]
        torch.testing.assert_close(logits[b], reference, atol=1e-4, rtol=1e-4)
    assert (runs["original"][0][:, 0] - logits[:, 0]).abs().max() > 1e-4


def test_visionzip_renumber_is_refused_with_pruning_inside_the_llm():
    with pytest.raises(ValueError, match="positions=original"):
        ve.wrap(tiny_model("llava")[0], "visionzip:positions=renumber+fastv:layer=1")


def pdrop_authors_forward(model, embeds, prompt_length, image_index, image_tokens, layer_list, ratio):
    """github.com/Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py, pdrop_forward + pdrop_rank_drop
    (inference, one sample, no padding) on `embeds` [1, n, C] = the prompt's embeddings and then the generated
    tokens' (causal: the prompt's rows are the prefill's): after layer rank_layer - 1 for each rank_layer in
    layer_list, the last prompt row's attention at layer rank_layer (its input_layernorm, q / k projections, rotary at
    the current position_ids) ranks the image tokens (pdrop_authors_rank), int(n x ratio^stage) stay, and position_ids
    become 0..n'-1 (the decoded tokens' positions move back as much, as pdrop_forward's decoding branch moves them).
    -> (final hidden states [1, n', C], kept image positions per stage). The key heads are repeated for the query
    heads (grouped-query attention; LLaVA-1.5 has none)."""
    text = model.model.language_model
    hidden, rows = embeds, torch.arange(embeds.shape[1])
    kept = []
    for layer_idx, decoder_layer in enumerate(text.layers):
        position_ids = torch.arange(hidden.shape[1])[None]
        cos, sin = text.rotary_emb(hidden, position_ids)
        mask = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()[None, None]
        hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        stage = layer_list.index(rank_layer)
        cur_tokens, keep_length = int(image_tokens * ratio**stage), int(image_tokens * ratio**(stage + 1))
        attention = text.layers[rank_layer].self_attn
        x = text.layers[rank_layer].input_layernorm(hidden)
        q = attention.q_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
        cos, sin = text.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        last = prompt_length - (image_tokens - cur_tokens) - 1  # prompt_total_len - 1 in the current rows
        weights = (q[0, :, last:last + 1] @ k[0].transpose(1, 2) / math.sqrt(attention.head_dim))
        weights = weights.masked_fill(torch.arange(hidden.shape[1]) > last, float("-inf")).softmax(-1)
        top = pdrop_authors_rank(weights, image_index, cur_tokens, keep_length)
        start = image_index + cur_tokens
        index = torch.cat([torch.arange(image_index), top, torch.arange(start, hidden.shape[1])])
        hidden, rows = hidden[:, index], rows[index]
        kept.append(rows[image_index:image_index + keep_length].tolist())
    return text.norm(hidden), kept


def test_pdrop_renumber_stages_equal_the_authors_code():
    """pdrop:positions=renumber: the kept image tokens at every stage and the generated tokens' logits equal the
    authors' forward written out (pdrop_authors_forward), each prompt of a left-padded batch against its own (rotary
    positions are relative: the padding's offset is no difference); positions=original keeps other tokens at the
    later stages or other logits."""
    from test_engine import greedy

    model, processor = tiny_model("llava")
    batch = one_image_each(processor)
    layers, ratio = (1, 2), 0.5
    runs = {}
    for positions in ("renumber", "original"):
        spec = f"pdrop:layers={'/'.join(map(str, layers))},ratio={ratio},positions={positions}"
        ve.wrap(model, spec)
        out = greedy(model, batch)
        run = ve.engine_of(model).run
        stages = [[[p for p in run.layer_positions[l][b].tolist() if p >= 0 and bool(run.layout.visual[b, p])]
                   for l in layers] for b in range(2)]
        runs[positions] = torch.stack(out.logits, 1), out.sequences, stages
        ve.unwrap(model)
    logits, sequences, stages = runs["renumber"]
    prompt_length = batch["input_ids"].shape[1]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(batch["input_ids"])
        image_features = model.model.get_image_features(pixel_values=batch["pixel_values"])
        image_features = getattr(image_features, "pooler_output", image_features)
        image_features = torch.cat(list(image_features)) if isinstance(image_features, (list, tuple)) else image_features
        image = batch["input_ids"] == ve.get_adapter(model).image_token_id(model)
        embeds = embeds.masked_scatter(image[..., None], image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
    for b in range(2):
        valid = batch["attention_mask"][b].bool()
        pad = int((~valid).sum())
        start, count = image_span(model, batch, b)
        generated = sequences[b, prompt_length:-1]
        full = torch.cat([embeds[b][valid], model.get_input_embeddings()(generated)])[None]
        with torch.no_grad():
            hidden, kept = pdrop_authors_forward(model, full, prompt_length - pad, start - pad, count, list(layers), ratio)
            reference = model.lm_head(hidden)[0, hidden.shape[1] - generated.shape[0] - 1:]
        assert stages[b] == [[p + pad for p in stage] for stage in kept]
        torch.testing.assert_close(logits[b], reference, atol=1e-4, rtol=1e-4)
    assert runs["original"][2] != stages or (runs["original"][0] - logits).abs().max() > 1e-4


@pytest.mark.parametrize("spec", ["pdrop:layers=1/2,ratio=0.5", "sparsevlm:layers=0/1"])
def test_renumbered_stages_feed_contiguous_positions(spec):
    """positions=renumber inside the LLM (as github.com/Gumpest/SparseVLMs, modelling_sparse_llama.py, and
    Cooperx521/PyramidDrop feed each stage): every layer after a stage gets its real rows' positions contiguous from
    the sample's first, its rotary tables at those positions, and each decoded token the position after the layer's
    last prompt row; positions=original differs in the logits."""
    from test_engine import greedy

    model, processor = tiny_model("llava")
    batch = one_image_each(processor)
    text = model.model.language_model
    outputs = {}
    for positions in ("original", "renumber"):
        seen = {}
        ve.wrap(model, f"{spec},positions={positions}")

        def record(idx):
            def hook(module, args, kwargs):
                seen.setdefault(idx, []).append((kwargs["position_ids"], kwargs["position_embeddings"]))
            return hook

        handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(text.layers)]
        out = greedy(model, batch)
        run = ve.engine_of(model).run
        for handle in handles:
            handle.remove()
        ve.unwrap(model)
        outputs[positions] = torch.stack(out.logits, 1)
    dropped = [idx for idx in seen if run.layer_positions[idx] is not None]  # the layers after a stage
    for idx in dropped:
        (prefill_ids, (cos, sin)), (decode_ids, _) = seen[idx][0], seen[idx][1]
        rows = run.layer_positions[idx]
        valid = run.valid_keys(rows)
        for b in range(2):
            ids = prefill_ids.expand(2, -1)[b][valid[b]]
            assert torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + ids.numel()))
            assert int(decode_ids.expand(2, -1)[b, 0]) == int(ids[-1]) + 1
        expected_cos, _ = text.rotary_emb(cos, prefill_ids)
        torch.testing.assert_close(cos, expected_cos)
    assert dropped and (outputs["original"] - outputs["renumber"]).abs().max() > 1e-4


def test_renumbered_stages_are_refused_for_qwen():
    with pytest.raises(ValueError, match="3-D"):
        ve.wrap(tiny_model("qwen2_vl")[0], "pdrop:positions=renumber")
    with pytest.raises(ValueError, match="3-D"):
        ve.wrap(tiny_model("qwen2_vl")[0], "sparsevlm:positions=renumber")
