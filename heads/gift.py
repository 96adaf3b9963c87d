"""GIFT (Qi et al., 2025, "Gaze Shift-Guided Cross-modal Fusion Enhancement for Vision-Language Models").

Default, `variant=code`: the authors' release (github.com/amazon-science/GIFT, inference.py: get_token_indices,
process_attention_maps, compute_attention_heatmap; transformers-4.50.0/.../llama/modeling_llama.py:
eager_attention_forward), configs/llava_1.5_7b.yaml: saliency layer 11, boost layers 12..22, alpha 5.
- Saliency (prefill, layer 11 of 32, scaled): the question span runs from (last image token + `query_start`) to
  (prompt length - `query_end`), both inclusive; the authors' LLaVA-1.5 offsets, 3 and 6, skip the template's
  tokens after the image and " ASSISTANT:" (their Qwen2-VL offsets: 2 and 6). Per row i of the span, the gaze shift
  is max(A_i - A_{i-1}, 0) on every image key; only the rows of content words are kept (`words=content`); the top
  H // 2 heads by summed shift are averaged with those rows into one map, clamped to mean +- 3 sigma (unbiased),
  min-max normalised to S in [0, 1].
- Boost (layers 12..22 of 32, scaled; the last prompt row and every decoding row): the top H // 2 heads by image
  attention get image attention A_j -> A_j exp(alpha S_j); one factor r = (boosted image mass) / (image mass),
  summed over those heads, multiplies the question-span attention of the top H // 2 heads by question attention (a
  head set of its own); every row is renormalised.
Content words: the authors tag the question with spaCy (NOUN, PROPN, VERB, ADJ, ADV, NUM) and keep the tokens that
overlap one. Here a token is a content token unless it is a closed-class English word (determiners, prepositions,
pronouns, auxiliaries, conjunctions, particles, interjections: FUNCTION_WORDS) or has no letter or digit; the
tokenizer (`tokenizer=`, default: the model's own, from its name_or_path, offline) gives each token's text.
`words=all` keeps every row of the span. Where the authors' code would divide by zero (no content row, a flat map),
the saliency here is zero: no boost.

`variant=paper`: the paper's definitions as REFERENCE.md gives them: heads ranked by image attention (top 50%,
rounded) for the saliency too, the map summed over the question rows (all text after the last image) and clipped
only from above at mean + 3 std (population), min-max normalised; the boost's question factor r per head and row,
times `beta` (paper: beta = 1 keeps the question:image balance). The saliency is read from the layer's own attention
(an observing post-softmax edit that changes nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vlm_efficient.method import UNSTRUCTURED, AttentionEdit, Method, at_positions
from vlm_efficient.registry import register_method

from .common import check_range, has_image, last_prompt_rows, parse_layers, scaled_range, scatter_positions

VARIANTS = ("code", "paper")
WORDS = ("content", "all")
# closed-class English words: spaCy's DET, ADP, PRON, AUX, CCONJ, SCONJ, PART and INTJ tags, which the authors'
# CONTENT_TAGS leave out; the wh-adverbs (how, where, when, why) are ADV, content words, to spaCy
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither another such what which whose whatever
whichever in on at of to for with by from about into onto over under above below between among through during before
after behind beside besides near off out up down around against along across within without upon like than as via
per toward towards beneath i me my mine you your yours he him his she her hers it its we us our ours they them their
theirs who whom myself yourself himself herself itself ourselves themselves there is are was were be been being am do
does did have has had will would shall should can could may might must and or but nor so yet if because while
although though whether since unless until not n't 's 're 've 'm 'd 'll yes oh please
""".split())


def content_tokens(tokens: list[str]) -> list[bool]:
    """Per token (the tokenizer's token strings), whether it belongs to a content word. A word starts at a token
    marked as a word start (byte-level BPE's "Ġ", SentencePiece's "▁") or at a change between word and non-word
    characters; it is a content word if it holds a letter or digit and is not in FUNCTION_WORDS."""
    texts = ["" if re.fullmatch(r"<.*>", token) else token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
             for token in tokens]  # special and byte tokens (<0x0A>) hold no word
    words: list[list[int]] = []
    previous_is_word = False
    for index, text in enumerate(texts):
        is_word = bool(re.search(r"[^\W_]", text))
        if not words or not is_word or not previous_is_word or text[:1].isspace():
            words.append([])
        words[-1].append(index)
        previous_is_word = is_word
    flags = [False] * len(tokens)
    for word in words:
        text = "".join(texts[i] for i in word).strip().lower()
        if re.search(r"[^\W_]", text) and text not in FUNCTION_WORDS:
            for i in word:
                flags[i] = True
    return flags


def gaze_shift_saliency(probs: torch.Tensor, question: torch.Tensor, image: torch.Tensor, head_ratio: float):
    """variant=paper: saliency [n_image] of one sample from its attention probs [H, q, kv], question rows [q] and
    image keys [kv]."""
    attention = probs[:, question][:, :, image]  # [H, nq, ni]
    if attention.shape[1] < 2:
        return attention.new_zeros(attention.shape[2])
    heads = max(1, int(probs.shape[0] * head_ratio + 0.5))
    top = attention.sum(-1).mean(-1).topk(heads).indices
    shifts = (attention[top, 1:] - attention[top, :-1]).clamp(min=0).sum((0, 1))
    shifts = shifts.clamp(max=float(shifts.mean() + 3 * shifts.std(correction=0)))
    low, high = shifts.min(), shifts.max()
    return (shifts - low) / (high - low) if high > low else torch.zeros_like(shifts)


def code_saliency(probs: torch.Tensor, rows: torch.Tensor, image: torch.Tensor, heads: int) -> torch.Tensor:
    """variant=code: saliency [n_image] of one sample from its attention probs [H, q, kv], the chosen shift rows
    [q] (each compared with the row before it) and image keys [kv]; the authors' process_attention_maps and
    compute_attention_heatmap without the final exp."""
    attention = probs[:, :, image]  # [H, q, ni]
    chosen = rows.nonzero().flatten()
    chosen = chosen[chosen > 0]
    if chosen.numel() == 0:
        return attention.new_zeros(attention.shape[2])
    shifts = (attention[:, chosen] - attention[:, chosen - 1]).clamp(min=0)  # [H, nr, ni]
    top = shifts.sum((1, 2)).topk(heads).indices
    heatmap = shifts[top].mean((0, 1))
    mean, std = heatmap.mean(), heatmap.std()
    heatmap = heatmap.clamp(min=float(mean - 3 * std), max=float(mean + 3 * std))
    low, high = heatmap.min(), heatmap.max()
    return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)


def top_heads(mass: torch.Tensor, count: int) -> torch.Tensor:
    """[B, H, q] -> boolean of the top `count` heads per (sample, row) by `mass`."""
    rank = mass.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return rank < count


@register_method
@dataclass
class GIFT(Method):
    name = "gift"
    summary = "saliency from gaze shifts at prefill; boost salient image and question attention while decoding"
    reported = "CHAIR_S ~49 -> 39.8, CHAIR_I -> 10.6 (LLaVA-1.5-7B); Qwen2-VL-7B 24.8 / 9.1 -> 21.2 / 7.7"

    alpha: float = 5.0
    beta: float = 1.0  # variant=paper only
    head_ratio: float = 0.5
    saliency_layer: int = -1  # default 11 of 32, scaled
    layers: str = ""  # default 12..22 of 32, scaled
    variant: str = "code"
    words: str = "content"  # variant=code: the saliency rows, content words or all the span
    query_start: int = 3  # variant=code: the span's first row after the last image token
    query_end: int = 6  # variant=code: the span's last row, counted back from the prompt's end
    tokenizer: str = ""  # words=content: a tokenizer directory or hub id (default: the model's, offline)

    def bind(self, engine) -> None:
        check_range("gift", "head_ratio", self.head_ratio, 0.0, 1.0)
        if self.variant not in VARIANTS:
            raise ValueError(f"gift: variant={self.variant!r}: use code (the authors' release) or paper")
        if self.words not in WORDS:
            raise ValueError(f"gift: words={self.words!r}: use content (the authors' rows) or all")
        if self.beta <= 0 or (self.variant == "code" and self.beta != 1.0):
            raise ValueError(f"gift: beta={self.beta}: the paper's question factor, > 0, with variant=paper only")
        if self.query_start < 1 or self.query_end < 1:
            raise ValueError("gift: query_start and query_end must be >= 1 (the span starts after the image and "
                             "ends inside the prompt)")
        n = engine.num_layers
        self.source = int(11 * n / 32 + 0.5) if self.saliency_layer < 0 else self.saliency_layer
        boosted = scaled_range(12, 22, n)
        if self.saliency_layer < 0:  # scaled, the paper's 11 / 12 may round to one layer: boost the later ones
            boosted = range(max(boosted.start, self.source + 1), max(boosted.stop, self.source + 2))
        self.chosen = parse_layers("gift", self.layers, n, boosted)
        if not 0 <= self.source < min(self.chosen):
            raise ValueError(
                f"gift: saliency_layer={self.source} must come before the boosted layers {self.chosen[0]}.."
            )
        self.words_tokenizer = None
        self.pending_ids = None
        if self.variant == "code" and self.words == "content":
            self.words_tokenizer = self._load_tokenizer(engine.model)
            engine.before_prefill(self._remember_ids)

    def _load_tokenizer(self, model):
        from transformers import AutoTokenizer

        source = self.tokenizer or getattr(model, "name_or_path", "")
        try:
            if not source:
                raise OSError("the model has no name_or_path")
            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"gift: words=content needs the model's tokenizer to find the question's content words, and none "
                f"loads offline from {source!r} ({error}). Pass tokenizer=<directory or hub id>, or words=all to "
                "use every row of the question span."
            ) from None

    def _remember_ids(self, inputs: dict) -> None:
        self.pending_ids = inputs.get("input_ids")

    def _question_span(self, layout) -> torch.Tensor:
        """[B, N]: text positions from the last image token + query_start to the prompt length - query_end."""
        positions = torch.arange(layout.length, device=layout.kind.device)
        start = layout.last_visual_position[:, None] + self.query_start
        return layout.text & (positions >= start) & (positions <= layout.length - self.query_end)

    def attention_edit(self, layer, run, context):
        memory = run.memory(self)
        if context.prefill and layer == self.source and has_image(run):
            observe = self._observe_code if self.variant == "code" else self._observe_paper
            return AttentionEdit(post_softmax=lambda probs: observe(probs, run, context))
        saliency = memory.get("saliency")
        if layer not in self.chosen or saliency is None:
            return None
        image = context.keys_where(run.layout.visual)[:, None, None, :]
        boost = torch.exp(self.alpha * at_positions(saliency, context.key_positions, 0.0))[:, None, None, :]
        if self.variant == "code":
            question = context.keys_where(self._question_span(run.layout))[:, None, None, :]
            post_softmax = self._code_boost(image, question, boost)
        else:
            question = context.keys_where(run.layout.after_visual_text)[:, None, None, :]
            post_softmax = self._paper_boost(image, question, boost)
        return AttentionEdit(post_softmax=post_softmax, rows=last_prompt_rows(context))

    def _code_boost(self, image, question, boost):
        def post_softmax(probs):
            heads = max(1, int(probs.shape[1] * self.head_ratio))
            visual = (probs * image).sum(-1)  # [B, H, q]
            vision_heads = top_heads(visual, heads)[..., None]
            question_heads = top_heads((probs * question).sum(-1), heads)[..., None]
            boosted = torch.where(image & vision_heads, probs * boost, probs)
            enhanced = ((boosted * image).sum(-1) * vision_heads[..., 0]).sum(1, keepdim=True)
            original = (visual * vision_heads[..., 0]).sum(1, keepdim=True)
            scale = torch.where(original > 0, enhanced / original.clamp_min(1e-30), 1.0)[..., None]  # [B, 1, q, 1]
            boosted = torch.where(question & question_heads, boosted * scale, boosted)
            return boosted / boosted.sum(-1, keepdim=True)

        return post_softmax

    def _paper_boost(self, image, question, boost):
        def post_softmax(probs):
            visual = (probs * image).sum(-1, keepdim=True)
            boosted = torch.where(image, probs * boost, probs)
            ratio = torch.where(visual > 0, (boosted * image).sum(-1, keepdim=True) / visual.clamp_min(1e-30), 1.0)
            boosted = torch.where(question, boosted * self.beta * ratio, boosted)
            boosted = boosted / boosted.sum(-1, keepdim=True)
            chosen = top_heads(visual[..., 0], max(1, int(probs.shape[1] * self.head_ratio + 0.5)))[..., None]
            return torch.where(chosen, boosted, probs)

        return post_softmax

    def kernel_edit(self, layer, run, prefill):
        """No structured form (the boost ranks the heads of each row and rescales the question by the row's image
        mass: no per (head, key group) table expresses it), but None where attention_edit is None, so the engine
        leaves the other layers alone without asking attention_edit at every decoding step."""
        if prefill and layer == self.source and has_image(run):
            return UNSTRUCTURED
        if layer not in self.chosen or run.memory(self).get("saliency") is None:
            return None
        return UNSTRUCTURED

    def _observe_paper(self, probs, run, context):
        question = context.queries_where(run.layout.after_visual_text)
        image = context.keys_where(run.layout.visual)
        saliency = torch.zeros(image.shape, dtype=torch.float32, device=probs.device)
        for b in range(probs.shape[0]):
            saliency[b, image[b]] = gaze_shift_saliency(probs[b], question[b], image[b], self.head_ratio)
        run.memory(self)["saliency"] = scatter_positions(saliency, context.key_positions, run.layout.length)
        return probs

    def _observe_code(self, probs, run, context):
        span = self._question_span(run.layout)
        if self.words_tokenizer is not None:
            ids, self.pending_ids = self.pending_ids, None
            if ids is None or ids.shape != span.shape:
                raise ValueError("gift: words=content needs the prompt's input_ids at prefill")
            words = [content_tokens([t or "<>" for t in self.words_tokenizer.convert_ids_to_tokens(sample)]) for sample in ids.tolist()]
            span = span & torch.tensor(words, dtype=torch.bool, device=span.device)
        rows = context.queries_where(span)
        image = context.keys_where(run.layout.visual)
        heads = max(1, int(probs.shape[1] * self.head_ratio))
        saliency = torch.zeros(image.shape, dtype=torch.float32, device=probs.device)
        for b in range(probs.shape[0]):
            saliency[b, image[b]] = code_saliency(probs[b].float(), rows[b], image[b], heads)
        run.memory(self)["saliency"] = scatter_positions(saliency, context.key_positions, run.layout.length)
        return probs
