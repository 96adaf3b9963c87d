"""AKI modality-mutual attention, MMA (Wang, Wang, Suzuki, Kobayashi, 2025, "Seeing is Understanding: Unlocking
Causal Attention into Modality-Mutual Attention for Multimodal LLMs", arXiv 2503.02597; code github.com/sony/aki):
causal attention, plus image rows may ALSO attend to the text that follows them in the prompt.

Paper: the input is [V, T_Q] (image tokens, then the text question) and the answer T_R is decoded; MMA lets the image
tokens attend to the question tokens T_Q, never to the answer. Public code (`_make_modality_mutual_mask` in
codes/open_flamingo/src/vlm.py): ONE 4-D mask for the whole language model, so every layer; causal plus
`mask[image_start:image_end, image_end:text_end] = 1`, where text_end is just past the first `<|assistant|>` token
(Phi-3's id 32001, hard-coded): the rest of the user turn and that tag. Its template puts the system prompt before
`<image>`, so image rows already see it causally. Generation (aki_generation.py) falls back to a plain 2-D mask after
the prefill: decode rows are causal and read the image keys / values the prefill computed with MMA. The code builds
the mask for one image per sample.

Here (all layers by default, `layers=` to restrict):
- `variant=paper` (default): an image row sees every TEXT token of the prompt after it (the question and the chat
  template's tail; with several images, also the text between them). Other images' tokens stay causal.
- `variant=code`: an image row sees the contiguous span after ITS image, every token of it (with several images the
  code's slice would cover later images' tokens too), up to and including the first `end_token` id after the image
  (the code's `<|assistant|>`: pass your template's id); `end_token=-1` or no such token: to the prompt's end.

KV cache: the edges exist only in the prefill (AttentionEdit.allow). Within that single call the image rows' hidden
states at layer l+1 depend on the later text; their keys and values are cached from it, and decode rows, which come
after everything, read them with the model's causal attention, as the public code's generation does. A prompt fed
over several calls would lose the edges (calls after the first are decoding for the engine). AKI trains with MMA
(SFT; POPE 79.8 -> 82.7); training-free it changes what the model was trained on and costs quality: measure it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import AttentionEdit, PerThread, at_positions
from vlm_efficient.registry import register_method

from .common import PrefillMask, has_image

VARIANTS = ("paper", "code")


@register_method
@dataclass
class AKI(PrefillMask):
    name = "aki"
    summary = "mask: image rows may also see the text after them in the prompt (modality-mutual; prefill only)"
    reported = "POPE 79.8 -> 82.7, trained with the mask (training-free use is not reported)"
    pending_ids = PerThread()  # input_ids of the calling thread's next prefill

    variant: str = "paper"
    end_token: int = -1  # variant=code: the token that ends the span (the public code's <|assistant|>)

    def bind(self, engine) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"aki: variant={self.variant!r}: use paper (later text) or code (the code's span)")
        if self.end_token != -1 and self.variant != "code":
            raise ValueError("aki: end_token ends the public code's span: add variant=code")
        super().bind(engine)
        self.pending_ids = None
        if self.variant == "code" and self.end_token >= 0:
            engine.before_prefill(self._remember_ids)

    def _remember_ids(self, inputs: dict) -> None:
        self.pending_ids = inputs.get("input_ids")

    def _code_spans(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] per visual position: the first and last position (inclusive) its row may see beyond causality."""
        memory = run.memory(self)
        if "spans" not in memory:
            ids, self.pending_ids = self.pending_ids, None
            layout = run.layout
            start = torch.full_like(layout.image_index, -1)
            end = torch.full_like(layout.image_index, -1)
            for b, items in enumerate(layout.images):
                for item in range(len(items)):
                    where = (layout.image_index[b] == item) & layout.visual[b]
                    after = int(where.nonzero().max()) + 1
                    last = layout.length - 1
                    if ids is not None:
                        hits = ((ids[b].to(where.device) == self.end_token) & layout.valid[b]).nonzero().flatten()
                        hits = hits[hits >= after]
                        last = int(hits[0]) if hits.numel() else last
                    start[b, where], end[b, where] = after, last
            memory["spans"] = (start, end)
        return memory["spans"]

    def attention_edit(self, layer, run, context):
        if not context.prefill or layer not in self.chosen or not has_image(run):
            return None
        layout = run.layout
        rows = context.queries_where(layout.visual)[:, :, None]
        keys = context.key_positions[:, None, :]
        if self.variant == "paper":
            later = keys > context.query_positions[:, :, None]
            allow = rows & later & context.keys_where(layout.text)[:, None, :]
        else:
            start, end = self._code_spans(run)
            first = at_positions(start, context.query_positions, -1)[:, :, None]
            last = at_positions(end, context.query_positions, -1)[:, :, None]
            allow = rows & (keys >= first) & (keys <= last) & context.keys_where(layout.valid)[:, None, :]
        return AttentionEdit(allow=allow[:, None])
