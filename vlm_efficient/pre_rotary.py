"""Queries and keys before rotary position, for methods that need logits without it (`Method.uses_unrotated`).

Forward hooks on the modules that output a layer's pre-rotary query and key (the adapter names them: q_proj /
k_proj, or Qwen3's q_norm / k_norm, which act before rotary) capture them for that layer's attention call. The
prefill keeps the prompt's pre-rotary keys beside the KV cache (run.pre_rotary_keys), for the decoding calls.
"""

from __future__ import annotations

import torch

from .method import Method, PerThread
from .run_state import RunState


class PreRotaryCapture:
    """The captured pre-rotary outputs of the calling thread's current layer calls, and the prompt keys kept per run."""

    captured: dict[int, dict[str, torch.Tensor]] = PerThread(dict)  # this call's pre-rotary q / k, per layer

    def hook(self, idx: int, part: str, current_run):
        """A forward hook keeping layer idx's `part` ("query" / "key") while `current_run()` is a run."""

        def hook(module, args, output):
            if current_run() is not None:
                self.captured.setdefault(idx, {})[part] = output

        return hook

    def take(self, idx: int, query: torch.Tensor, key: torch.Tensor, run: RunState | None, methods: list[Method]):
        """(query [B, Hq, q, d], key [B, Hkv, m, d]) before rotary position for this call of layer idx, or None where
        no method declared uses_unrotated(idx). The prefill keeps the prompt's pre-rotary keys of the rows this layer
        caches (after any pruning, so they stay aligned with the cache); decoding gets them back as the first m =
        (cached prompt keys) of the layer's keys. Keys of generated tokens are not kept: the base logit of a pair on
        them stays rotated (generated tokens are text; no method needs them unrotated)."""
        captured = self.captured.pop(idx, None)
        if captured is None or run is None or not any(m.uses_unrotated(idx) for m in methods):
            return None
        batch, _, q_len, dim = query.shape
        plain_query = captured["query"].reshape(batch, q_len, -1, dim).transpose(1, 2)
        if run.prefill:
            plain_key = captured["key"].reshape(batch, q_len, -1, dim).transpose(1, 2)
            if plain_key.shape[2] != key.shape[2]:
                raise ValueError(
                    f"layer {idx}: the cache handed the attention {key.shape[2]} keys for a prefill of {q_len} rows. "
                    "Pre-rotary keys are kept beside the KV cache, aligned with the keys it holds: feed the prompt in "
                    "one call, on an empty cache."
                )
            run.pre_rotary_keys[idx] = plain_key
            return plain_query, plain_key
        plain_key = run.pre_rotary_keys.get(idx)
        if plain_key is None or plain_key.shape[2] > key.shape[2]:
            raise RuntimeError(f"layer {idx}: decoding without the prefill's pre-rotary keys of this layer's cache")
        return plain_query, plain_key
