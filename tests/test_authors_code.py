"""Each method against a transcription of its authors' public code: the selection or edit function of the authors'
repository, transcribed as written (names, order of operations, tie rules), run on the same tensors as the library,
with equal kept sets or equal edited probabilities asserted. Each test names the repository and file it transcribes.
Where the library's default follows the paper instead, the test runs the library's code variant (`variant=code`,
`count=code`, ...)."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from test_heads_dense import Prompt, assert_matches, reference_logits, run_wrapped
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
