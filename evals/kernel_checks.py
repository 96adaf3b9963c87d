"""Kernel-vs-reference checks shared by the CPU interpreter tests and the GPU tests.

    TRITON_INTERPRET=1 python -m vlm_efficient.evals.kernel_checks --size tiny --json   # CPU, Triton interpreter
    python -m vlm_efficient.evals.kernel_checks --size gpu                               # CUDA

Every check draws fresh random inputs, poisons outputs it can (NaN-filled `out=` where the API has one), and
returns (name, ok, detail). Negative checks make sure a wrong mask / wrong query row is detected."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..kernels.api import (
    ROLE_IMAGE,
    ROLE_LAST,
    ROLE_PREFIX,
    ROLE_QUESTION,
    GroupSpec,
    MaskSpec,
    RaggedKVCache,
    StructuredMask,
    TokenLayout,
    attention_with_received_stats,
    flash_attention,
    group_attention,
    group_decode_attention,
    masked_attention,
    masked_decode_attention,
    ragged_decode_attention,
    received_attention,
)
from ..kernels import group_attention as ga_module
from ..kernels.ragged_decode import dense_masked_decode

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-4}
STATS_TOL = 1e-3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _qkv(b, hq, hkv, nq, nk, d, dtype, device, gen):
    q = torch.randn(b, hq, nq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def _layout(b, n, device, gen, *, pad=(0, 3), text_before=5, img=(18, 6), grid_w=6):
    """Sample i: pad[i] left pads, text_before text tokens, an image of img[i] tokens (grid width grid_w), the rest
    text. Image position differs per sample."""
    is_img = torch.zeros(b, n, dtype=torch.bool)
    valid = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        p = pad[i % len(pad)]
        valid[i, :p] = False
        s = p + text_before + i
        is_img[i, s:s + img[i % len(img)]] = True
    return TokenLayout.from_modality(is_img, valid, grid_width=grid_w).to(device)


class Checks:
    def __init__(self, size: str, device: str):
        self.size = size
        self.device = torch.device(device)
        self.backend = "triton"
        self.results: list[tuple[str, bool, str]] = []
        self.gen = torch.Generator().manual_seed(1234)
        tiny = size == "tiny"
        # (B, Hq, Hkv, N, d, dtype)
        if tiny:
            self.shapes = [(2, 4, 2, 40, 64, torch.bfloat16), (2, 2, 2, 33, 80, torch.float16),
                           (1, 2, 1, 24, 128, torch.bfloat16)]
            self.n_mask = 44
            self.img = (18, 12)
            self.grid_w = 6
        else:
            self.shapes = [(2, 8, 2, 700, 64, torch.bfloat16), (2, 4, 4, 515, 80, torch.float16),
                           (2, 8, 2, 1100, 128, torch.bfloat16), (1, 4, 4, 1023, 128, torch.float16)]
            self.n_mask = 900
            self.img = (576, 400)
            self.grid_w = 24

    def record(self, name, ok, detail=""):
        self.results.append((name, bool(ok), detail))

    # ------------------------------------------------------------------ kernel 1
    def plain(self):
        for i, (b, hq, hkv, n, d, dt) in enumerate(self.shapes):
            q, k, v = _qkv(b, hq, hkv, n, n, d, dt, self.device, self.gen)
            kv = torch.ones(b, n, dtype=torch.bool, device=self.device)
            kv[-1, : 3 + i] = False
            causal = i != 1
            o, lse = flash_attention(q, k, v, causal=causal, key_valid=kv, return_lse=True, backend=self.backend)
            r, rl = flash_attention(q, k, v, causal=causal, key_valid=kv, return_lse=True, backend="reference")
            e = rel(o, r)
            fin = torch.isfinite(rl)
            le = float((lse[fin] - rl[fin]).abs().max()) if fin.any() else 0.0
            same_inf = bool((torch.isinf(lse) == ~fin).all())
            zero_pad = bool((o[-1, : 3 + i].float().abs().max() == 0) if causal else True)
            self.record(f"plain[{i}] d={d} {str(dt)[6:]} causal={causal}",
                        e < TOL[dt] and le < 2e-3 and same_inf and zero_pad and not torch.isnan(o).any(),
                        f"rel={e:.2e} lse={le:.1e} pad_rows_zero={zero_pad}")
        # decode-like: fewer queries than keys (bottom-right causal)
        b, hq, hkv, n, d, dt = self.shapes[0]
        q, k, v = _qkv(b, hq, hkv, 5, n, d, dt, self.device, self.gen)
        o = flash_attention(q, k, v, causal=True, backend=self.backend)
        r = flash_attention(q, k, v, causal=True, backend="reference")
        self.record("plain q_len<k_len", rel(o, r) < TOL[dt], f"rel={rel(o, r):.2e}")

    def specs(self):
        return {
            "naavit": MaskSpec.naavit(),
            "mutual": MaskSpec.modality_mutual(),
            "window": MaskSpec.neighbor_window(1, 2),
            "window_bidir": MaskSpec.neighbor_window(2, 1, causal_window=False),
            "knockout": MaskSpec.naavit().with_knockout((ROLE_QUESTION, ROLE_IMAGE), (ROLE_LAST, ROLE_PREFIX)),
            "knock_all_last": MaskSpec().with_knockout(*[(ROLE_LAST, r) for r in range(16)]),
        }

    def masked(self):
        n = self.n_mask
        for j, (name, spec) in enumerate(self.specs().items()):
            b, hq, hkv, _, d, dt = self.shapes[j % len(self.shapes)]
            b = 2
            layout = _layout(b, n, self.device, self.gen, img=self.img, grid_w=self.grid_w)
            mask = StructuredMask(layout, spec)
            q, k, v = _qkv(b, hq, hkv, n, n, d, dt, self.device, self.gen)
            o = masked_attention(q, k, v, mask=mask, backend=self.backend)
            r = masked_attention(q, k, v, mask=mask, backend="reference")
            e = rel(o, r)
            ok = e < TOL[dt] and not torch.isnan(o).any()
            detail = f"rel={e:.2e} d={d} {str(dt)[6:]}"
            if name == "knock_all_last":  # rows with every edge knocked out must be exactly 0
                last = layout.role == ROLE_LAST
                zero = float(o.float()[last].abs().max())
                ok = ok and zero == 0.0
                detail += f" blocked_rows_max={zero}"
            lists = mask.block_lists(*_bm_bn(q))
            detail += f" blocks {lists.computed_blocks}/{lists.total_blocks}"
            self.record(f"masked {name}", ok, detail)
            if name == "naavit":  # negative: the kernel's NAAViT output must NOT match plain causal
                wrong = masked_attention(q, k, v, mask=StructuredMask(layout, MaskSpec()), backend="reference")
                ew = rel(o, wrong)
                self.record("masked naavit != causal (negative)", ew > 10 * TOL[dt], f"rel={ew:.2e}")

    # ------------------------------------------------------------------ kernel 2
    def stats_vs_reference(self, name, dt, q, k, v, *, stats_impl="auto", show_shape=False, **kw):
        """attention_with_received_stats, kernel vs reference: output within TOL[dt], statistics within STATS_TOL.
        Returns the kernel's statistics."""
        o, rec = attention_with_received_stats(q, k, v, backend=self.backend, stats_impl=stats_impl, **kw)
        r, rr = attention_with_received_stats(q, k, v, backend="reference", **kw)
        e, es = rel(o, r), rel(rec, rr)
        detail = f"out rel={e:.2e} received rel={es:.2e}" + (f" shape={tuple(rec.shape)}" if show_shape else "")
        self.record(name, e < TOL[dt] and es < STATS_TOL, detail)
        return rec

    def stats(self):
        for i, (b, hq, hkv, n, d, dt) in enumerate(self.shapes[:3]):
            q, k, v = _qkv(b, hq, hkv, n, n, d, dt, self.device, self.gen)
            kv = torch.ones(b, n, dtype=torch.bool, device=self.device)
            kv[-1, :4] = False
            sq = torch.full((b, 4), -1, dtype=torch.long)
            sq[:, 0] = n - 1
            sq[0, 1] = n // 2
            sq[-1, 1:3] = torch.tensor([1, n - 1])  # a padded (fully masked) row and a duplicate
            sq = sq.to(self.device)
            for per_head in (True, False, "kv"):
                self.stats_vs_reference(f"stats[{i}] per_head={per_head}", dt, q, k, v, key_valid=kv, causal=True,
                                        stat_queries=sq, per_head=per_head, show_shape=True)
        # FastV: S = 1, last token, with a structured mask
        b, hq, hkv, _, d, dt = self.shapes[0]
        n = self.n_mask
        layout = _layout(2, n, self.device, self.gen, img=self.img, grid_w=self.grid_w)
        mask = StructuredMask(layout, MaskSpec.naavit())
        q, k, v = _qkv(2, hq, hkv, n, n, d, dt, self.device, self.gen)
        sq = torch.full((2, 1), n - 1, dtype=torch.long, device=self.device)
        rec = self.stats_vs_reference("stats masked naavit S=1", dt, q, k, v, stat_queries=sq, mask=mask)
        # negative: statistics of another row must differ
        _, wrong = attention_with_received_stats(q, k, v, stat_queries=sq - 3, mask=mask, backend="reference")
        self.record("stats other row differs (negative)", rel(rec, wrong) > 100 * STATS_TOL,
                    f"rel={rel(rec, wrong):.2e}")
        # fewer queries than keys (keys before the first query), non-causal, 200 rows (in-kernel column sums)
        b, hq, hkv, n, d, dt = self.shapes[1]
        q, k, v = _qkv(b, hq, hkv, n, n, d, dt, self.device, self.gen)
        for name, nq, causal, s, impl in (("q_len<k_len", max(3, n // 3), True, 3, "auto"),
                                          ("non-causal", n, False, 5, "auto"),
                                          ("S=200 shared rows", n, True, 200, "auto"),
                                          ("colsum S=3", n, True, 3, "colsum"),
                                          ("colsum q_len<k_len", max(3, n // 3), True, 2, "colsum"),
                                          ("logits S=150", n, True, 150, "logits")):
            qq = q[:, :, :nq]
            sq = torch.randint(-1, nq, (b, s), generator=self.gen).to(self.device)
            self.stats_vs_reference(f"stats {name}", dt, qq, k, v, causal=causal, stat_queries=sq, per_head=True,
                                    stats_impl=impl)
        # many rows, with duplicates: the fused column sums' split-per-block path (the rows pass: S=200 above)
        b, hq, hkv, n, d, dt = self.shapes[0]
        q, k, v = _qkv(b, hq, hkv, n, n, d, dt, self.device, self.gen)
        s = 300
        sq = torch.randint(-1, n, (b, s), generator=self.gen).to(self.device)
        self.stats_vs_reference("stats S=300 split rows", dt, q, k, v, stat_queries=sq, per_head="kv",
                                stats_impl="colsum")
        self.received_rows()

    def received_rows(self):
        """received_attention (the statistics alone, the rows pass) against its reference: every mask type with
        padded samples, GQA, fp32, fewer queries than keys."""
        n = self.n_mask
        for j, (name, spec) in enumerate(self.specs().items()):
            _, hq, hkv, _, d, dt = self.shapes[j % len(self.shapes)]
            layout = _layout(2, n, self.device, self.gen, img=self.img, grid_w=self.grid_w)
            mask = StructuredMask(layout, spec)
            q, k, _ = _qkv(2, hq, hkv, n, n, d, dt, self.device, self.gen)
            sq = torch.tensor([[n - 1, n // 2, 8], [n - 1, 1, -1]], device=self.device)  # row 1 of sample 1: padding
            kw = dict(stat_queries=sq, mask=mask, per_head="kv")
            got = received_attention(q, k, backend=self.backend, **kw)
            ref = received_attention(q, k, backend="reference", **kw)
            self.record(f"stats rows mask={name}", rel(got, ref) < STATS_TOL and bool(torch.isfinite(got).all()),
                        f"rel={rel(got, ref):.2e} d={d} {str(dt)[6:]}")
        b, hq, hkv, n, d, _ = self.shapes[0]
        q, k, _ = _qkv(b, hq, hkv, n, n, d, torch.float32, self.device, self.gen)
        kv = torch.ones(b, n, dtype=torch.bool, device=self.device)
        kv[-1, :5] = False
        for label, nq, causal in (("fp32 padded", n, True), ("fp32 q_len<k_len", n // 3, True),
                                  ("fp32 non-causal", n, False)):
            sq = torch.randint(-1, nq, (b, 7), generator=self.gen).to(self.device)
            kw = dict(stat_queries=sq, key_valid=kv, causal=causal, per_head=True)
            got = received_attention(q[:, :, n - nq:], k, backend=self.backend, **kw)
            ref = received_attention(q[:, :, n - nq:], k, backend="reference", **kw)
            self.record(f"stats rows {label}", rel(got, ref) < 1e-5, f"rel={rel(got, ref):.2e}")

    # ------------------------------------------------------------------ kernel 3
    def group(self):
        b, hq, hkv, n, d, dt = self.shapes[0]
        groups = torch.zeros(b, n, dtype=torch.long)
        groups[:, 6: 6 + n // 2] = 1
        sinks = torch.randperm(n // 2, generator=self.gen)[:3] + 6
        groups[:, sinks] = 2
        groups[:, 0] = 2
        groups = groups.to(self.device)
        sel = torch.zeros(b, n, dtype=torch.bool)
        sel[:, 6 + n // 2:] = True
        sel = sel.to(self.device)
        last = torch.zeros(b, n, dtype=torch.bool, device=self.device)
        last[:, -1] = True
        cases = {
            # the methods' tables (heads/pai.py, vaf.py, var.py, act.py) for groups text / image / sink
            "pai": (GroupSpec(hq, 3, logit_abs=[0.0, 0.5, 0.0]), last, None),
            "vaf": (GroupSpec(hq, 3, logit_scale=[0.95, 1.15, 1.0]).on_heads([0, 2]), None, None),
            "var": (GroupSpec(hq, 3, keep=[1.0, 1.0, 0.4], receive=[0.0, 1.0, 0.0], sink_group=2,
                              cond_mass_groups=(1, 2), cond_mass_min=0.05,
                              cond_ratio_groups=((1,), (1, 2)), cond_ratio_min=0.3), sel, None),
            "act": (GroupSpec(hq, 3, keep=[1.0, 1.0, 0.4], receive=[1.0, 1.0, 0.0], sink_group=2), None, None),
            "mixed+key_bias": (GroupSpec(hq, 3, logit_abs=torch.rand(hq, 3, generator=self.gen),
                                         logit_bias=torch.randn(hq, 3, generator=self.gen),
                                         keep=torch.tensor([1.0, 1.0, 0.3]), receive=torch.tensor([0.0, 1.0, 0.0]),
                                         sink_group=2), sel, torch.randn(b, n, generator=self.gen)),
        }
        for j, (name, (spec, qsel, kbias)) in enumerate(cases.items()):
            dt_j = torch.float16 if j % 2 else torch.bfloat16
            q, k, v = _qkv(b, hq, hkv, n, n, d, dt_j, self.device, self.gen)
            q = q * 2
            kv = torch.ones(b, n, dtype=torch.bool, device=self.device)
            kv[-1, :3] = False
            kbias_d = kbias.to(self.device) if kbias is not None else None
            kw = dict(key_group=groups, spec=spec, key_valid=kv, query_select=qsel, key_bias=kbias_d)
            o = group_attention(q, k, v, backend=self.backend, **kw)
            r = group_attention(q, k, v, backend="reference", **kw)
            plain = flash_attention(q, k, v, key_valid=kv, backend="reference")
            e, ep = rel(o, r), rel(plain, r)
            self.record(f"group {name} {str(dt_j)[6:]}", e < TOL[dt_j] and ep > 3 * e and not torch.isnan(o).any(),
                        f"rel={e:.2e} (plain differs by {ep:.2e})")
            # no padding: the unmodified tiles come from SDPA, the group kernel overwrites the modified ones
            kw["key_valid"] = None
            o = group_attention(q, k, v, backend=self.backend, **kw)
            r = group_attention(q, k, v, backend="reference", **kw)
            e = rel(o, r)
            self.record(f"group {name} {str(dt_j)[6:]} unpadded", e < TOL[dt_j] and not torch.isnan(o).any(),
                        f"rel={e:.2e}")
        # no padding, more selected rows than the rows path takes: VAR on 64-row tiles next to SDPA's
        spec, qsel, _ = cases["var"]
        q, k, v = _qkv(b, hq, hkv, n, n, d, torch.bfloat16, self.device, self.gen)
        kw = dict(key_group=groups, spec=spec, query_select=qsel.clone())  # a new tensor: no cached row list
        limit, ga_module.SELECTED_ROWS_MAX = ga_module.SELECTED_ROWS_MAX, 0
        try:
            e = rel(group_attention(q * 2, k, v, backend=self.backend, **kw),
                    group_attention(q * 2, k, v, backend="reference", **kw))
        finally:
            ga_module.SELECTED_ROWS_MAX = limit
        self.record("group var bfloat16 unpadded, tiles", e < TOL[torch.bfloat16], f"rel={e:.2e}")
        # float32, no padding, GQA: PAI's last row next to SDPA's rows
        spec, qsel, _ = cases["pai"]
        q, k, v = _qkv(b, hq, hkv, n, n, d, torch.float32, self.device, self.gen)
        kw = dict(key_group=groups, spec=spec, query_select=qsel)
        e = rel(group_attention(q * 2, k, v, backend=self.backend, **kw),
                group_attention(q * 2, k, v, backend="reference", **kw))
        self.record("group pai float32 unpadded", e < TOL[torch.float32], f"rel={e:.2e}")

    def group_decode(self):
        """The decoding form: one row per sample against the reference, group / bias buffers longer than the cache,
        key padding given as a strided bool view (as the engine passes the attention mask's last row); several key
        splits (one with no valid key) and one."""
        tiny = self.size == "tiny"
        cfgs = [(2, 8, 2, 40, 64), (2, 4, 4, 37, 80), (1, 8, 1, 50, 128), (2, 4, 2, 12, 64)] if tiny else \
            [(2, 32, 32, 700, 128), (2, 28, 4, 3000, 128), (1, 32, 8, 1200, 64), (1, 28, 4, 120, 128),
             (2, 8, 4, 1500, 256)]
        presets = lambda hq: {  # noqa: E731
            "pai": GroupSpec(hq, 3, logit_abs=[0.0, 0.5, 0.0]),
            "vaf": GroupSpec(hq, 4, logit_scale=[0.95, 1.15, 1.0, 1.3]).on_heads([0, 2]),
            "var": GroupSpec(hq, 3, keep=[1.0, 1.0, 0.4], receive=[0.0, 1.0, 0.0], sink_group=2,
                             cond_mass_groups=(1, 2), cond_mass_min=0.05,
                              cond_ratio_groups=((1,), (1, 2)), cond_ratio_min=0.3),
            "act": GroupSpec(hq, 3, keep=[1.0, 1.0, 0.4], receive=[1.0, 1.0, 0.0], sink_group=2),
            "mixed+key_bias": GroupSpec(hq, 3, logit_abs=torch.rand(hq, 3, generator=self.gen),
                                        logit_bias=torch.randn(hq, 3, generator=self.gen),
                                        keep=torch.tensor([1.0, 1.0, 0.3]), receive=torch.tensor([0.0, 1.0, 0.0])),
        }
        for i, (b, hq, hkv, n, d) in enumerate(cfgs):
            for j, (name, spec) in enumerate(presets(hq).items()):
                dt = (torch.bfloat16, torch.float16, torch.float32)[(i + j) % 3]
                q, k, v = _qkv(b, hq, hkv, 1, n, d, dt, self.device, self.gen)
                q = q * 2
                groups = torch.randint(0, spec.num_groups, (b, n + 9), generator=self.gen, dtype=torch.int32)
                groups[:, 2:5] = spec.num_groups - 1  # a few sinks in the last group (var / act)
                groups[:, n:] = 0  # the buffer beyond the cache: generated keys
                mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
                mask[-1, ..., : min(18, n // 2)] = False  # left padding: a whole split of keys where it is short
                key_valid = mask.to(self.device)[:, 0, -1, :]  # a strided view, as the engine passes it
                kbias = torch.randn(b, n + 9, generator=self.gen) if "key_bias" in name else None
                kw = dict(key_group=groups.to(self.device), spec=spec, key_valid=key_valid,
                          key_bias=None if kbias is None else kbias.to(self.device))
                o = group_decode_attention(q, k, v, backend=self.backend, **kw)
                r = group_decode_attention(q, k, v, backend="reference", **kw)
                plain = flash_attention(q, k, v, key_valid=key_valid, causal=False, backend="reference")
                e, ep = rel(o, r), rel(plain, r)
                self.record(f"group_decode {name} {b}x{hq}/{hkv}x{n}x{d} {str(dt)[6:]}",
                            e < TOL[dt] and ep > 3 * e and not torch.isnan(o).any(),
                            f"rel={e:.2e} (plain differs by {ep:.2e})")

    # ------------------------------------------------------------------ kernel 5
    def masked_decode(self):
        """One row per sample over a static buffer as the fast path's step holds it: keys a strided slice of a longer
        buffer, the mask a strided bool view longer than the keys (the layer's [B, 1, 1, capacity] mask), the query a
        transposed view; samples with padding, holes and (one) no valid key at all; one split and several."""
        tiny = self.size == "tiny"
        cfgs = [(2, 8, 2, 60, 64, torch.bfloat16), (3, 4, 4, 45, 80, torch.float16),
                (1, 8, 1, 70, 128, torch.float32), (2, 4, 2, 10, 64, torch.bfloat16)] if tiny else \
            [(1, 28, 4, 2393, 128, torch.bfloat16), (8, 32, 32, 700, 128, torch.bfloat16),
             (2, 32, 8, 5000, 64, torch.float16), (4, 16, 16, 40, 128, torch.bfloat16),
             (2, 8, 4, 1500, 256, torch.bfloat16)]  # head_dim 256: Gemma3
        for i, (b, hq, hkv, n, d, dt) in enumerate(cfgs):
            capacity = n + 7
            _, k, v = _qkv(b, 1, hkv, 1, capacity, d, dt, self.device, self.gen)
            k, v = k[:, :, :n], v[:, :, :n]
            q = torch.randn(b, 1, hq, d, generator=self.gen).to(self.device, dt).transpose(1, 2) * 2
            mask = torch.rand(b, 1, 1, capacity + 5, generator=self.gen) < 0.7
            mask[0, ..., :4] = False  # left padding
            if b > 2:
                mask[2] = False  # a sample with no valid key: zeros, as SDPA
            key_valid = mask.to(self.device)[:, 0, 0, :]
            for label, kv_arg in (("mask", key_valid), ("no mask", None)):
                o = masked_decode_attention(q, k, v, key_valid=kv_arg, backend=self.backend)
                r = masked_decode_attention(q, k, v, key_valid=kv_arg, backend="reference")
                e = rel(o, r)
                ok = e < TOL[dt] and not torch.isnan(o).any()
                if kv_arg is not None and b > 2:
                    ok = ok and bool((o[2] == 0).all())
                self.record(f"masked_decode {label} {b}x{hq}/{hkv}x{n}x{d} {str(dt)[6:]}", ok, f"rel={e:.2e}")
            o = masked_decode_attention(q, k, v, key_valid=key_valid, backend=self.backend)
            wrong = masked_decode_attention(q, k, v, key_valid=torch.roll(key_valid, 1, 1), backend="reference")
            e = rel(o, wrong)
            self.record(f"masked_decode (negative) shifted mask {b}x{hq}/{hkv}x{n}", e > 3 * TOL[dt],
                        f"rel to the shifted mask's reference {e:.2e}")
            # the head-averaged probabilities (A-VL's decoding reads them): the same output, and probabilities that
            # sum to 1 over the valid keys (0 for a sample with none), against the reference's
            o, mean = masked_decode_attention(q, k, v, key_valid=key_valid, head_mean=True, backend=self.backend)
            r, mean_r = masked_decode_attention(q, k, v, key_valid=key_valid, head_mean=True, backend="reference")
            e, em = rel(o, r), rel(mean, mean_r)
            sums = mean.sum(1)
            ok = (e < TOL[dt] and em < TOL[dt] and mean.dtype == torch.float32 and tuple(mean.shape) == (b, n)
                  and bool((mean[~key_valid[:, :n]] == 0).all())
                  and bool(torch.allclose(sums, key_valid[:, :n].any(1).float(), atol=1e-4)))
            self.record(f"masked_decode head_mean {b}x{hq}/{hkv}x{n}x{d} {str(dt)[6:]}", ok,
                        f"rel={e:.2e} probabilities rel={em:.2e}")
            wrong_mean = masked_decode_attention(q, k, v, key_valid=key_valid, head_mean=True,
                                                 backend="reference", scaling=0.5 * d ** -0.5)[1]
            self.record(f"masked_decode (negative) head_mean at half the scale {b}x{hq}/{hkv}x{n}",
                        rel(mean, wrong_mean) > 3 * TOL[dt], f"rel {rel(mean, wrong_mean):.2e}")

    # ------------------------------------------------------------------ kernel 6
    def key_sets(self):
        """A-VL's step over a static buffer: four steps in a row, kernel and reference from the same state, every set
        and score bit-equal after each step. Attention and scores take few distinct values, so the top-k selections
        meet many ties (the earlier position wins in both); padded samples, a sample without text to evict, generated
        slots written one per step."""
        from ..kernels import key_sets

        sizes = [37, 70, 130] if self.size == "tiny" else [700, 3000, 9000]
        for n in sizes:
            for interval, text_rate in ((2, 0.3), (3, 0.5), (1, 0.0)):
                b, length, generated = 3, n + 50, 6
                m = n - generated  # prompt slots, then the generated ones
                keys = torch.cat([torch.sort(torch.randperm(length, generator=self.gen)[:m]).values.expand(b, m),
                                  length + torch.arange(generated).expand(b, generated)], 1)
                visual = torch.zeros(b, n, dtype=torch.bool)
                visual[:, 4:4 + m // 2] = True
                valid = torch.ones(b, n, dtype=torch.bool)
                valid[1, :3] = False  # left padding
                prompt_text = ~visual & valid & (keys < length)
                prompt_text[2] = False  # no text keys at all
                secondary = visual & (torch.rand(b, n, generator=self.gen) < 0.6)
                core = secondary & (torch.rand(b, n, generator=self.gen) < 0.6)
                evicted = prompt_text & (torch.rand(b, n, generator=self.gen) < 0.1)
                score = torch.randint(0, 4, (b, n), generator=self.gen).float() / 8 * prompt_text
                state = {name: t.to(self.device) for name, t in dict(
                    secondary=secondary, core=core, score=score, evicted=evicted, prompt_text=prompt_text,
                    visual=visual, keys=keys).items()}  # fmt: skip
                mine = {name: t.clone() for name, t in state.items()}
                mask_mine, mask_ref = (torch.zeros(b, n, dtype=torch.bool, device=self.device) for _ in range(2))
                step_mine, step_ref = (torch.ones(1, dtype=torch.long, device=self.device) for _ in range(2))
                budgets = key_sets.text_budget(torch.arange(n + 1, device=self.device), text_rate)
                order = ("secondary", "core", "score", "evicted", "prompt_text", "visual", "keys")
                equal, ties = True, False
                for _ in range(4):
                    attention = (torch.randint(0, 5, (b, n), generator=self.gen).float() / 16).to(self.device)
                    before = state["core"].clone()
                    key_sets.step_triton(attention, *(mine[k] for k in order), mask_mine, step_mine, length=length,
                                         interval=interval, budgets=budgets if text_rate else None)
                    key_sets.step_reference(attention, *(state[k] for k in order), mask_ref, step_ref, length=length,
                                            interval=interval, text_rate=text_rate)
                    if int(step_ref) % interval == 0:  # the core re-picked: would later positions winning ties differ?
                        later = key_sets.top_k_mask(attention.flip(1), state["secondary"].flip(1),
                                                    before.sum(1)).flip(1)  # fmt: skip
                        ties = ties or not torch.equal(later, state["core"])
                    equal = equal and torch.equal(mask_mine, mask_ref) and all(
                        torch.equal(mine[k], state[k]) for k in order)
                    step_mine.add_(1)
                    step_ref.add_(1)
                name = f"key_sets {b}x{n} interval {interval} text_rate {text_rate}"
                self.record(name, equal, "every set, score and mask equal over 4 steps")
                self.record(f"key_sets (negative) ties to the later position differ {b}x{n} interval {interval}",
                            ties, "the checks meet ties")

    # ------------------------------------------------------------------ kernel 4
    def ragged(self):
        tiny = self.size == "tiny"
        cfgs = [(2, 8, 2, 60, 64, torch.bfloat16), (2, 4, 4, 45, 80, torch.float16),
                (1, 8, 1, 70, 128, torch.bfloat16)] if tiny else \
            [(2, 32, 8, 3000, 128, torch.bfloat16), (2, 8, 8, 1500, 80, torch.float16),
             (1, 16, 2, 5000, 64, torch.bfloat16)]
        for i, (b, hq, hkv, n, d, dt) in enumerate(cfgs):
            _, k, v = _qkv(b, 1, hkv, 1, n, d, dt, self.device, self.gen)
            keep = torch.rand(b, hkv, n, generator=self.gen) < torch.rand(b, hkv, 1, generator=self.gen)
            keep[0, 0] = False  # an empty segment
            keep = keep.to(self.device)
            kv = torch.ones(b, n, dtype=torch.bool, device=self.device)
            kv[-1, :3] = False
            extra = dict(min_split=16, target_programs=64, split_multiple=16) if tiny else {}
            cache = RaggedKVCache.from_dense(k, v, keep, max_new_tokens=3, key_valid=kv, **extra)
            keep_all = keep & kv[:, None, :]
            worst = 0.0
            for _ in range(2):
                q = torch.randn(b, hq, 1, d, generator=self.gen).to(self.device, dt)
                kn = torch.randn(b, hkv, 1, d, generator=self.gen).to(self.device, dt)
                vn = torch.randn(b, hkv, 1, d, generator=self.gen).to(self.device, dt)
                cache.append(kn, vn)
                k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
                keep_all = torch.cat([keep_all, torch.ones(b, hkv, 1, dtype=torch.bool, device=self.device)], 2)
                out = torch.full((b, 1, hq, d), float("nan"), dtype=dt, device=self.device)
                o = ragged_decode_attention(q, cache, out=out, backend=self.backend)
                r = ragged_decode_attention(q, cache, backend="reference")
                dense = dense_masked_decode(q, k, v, keep_all, d ** -0.5)
                worst = max(worst, rel(o, r), rel(dense, r) / 4)
            self.record(f"ragged[{i}] G={hq // hkv} d={d} splits={cache.n_split}", worst < TOL[dt],
                        f"rel={worst:.2e}")

    def ragged_graph(self):
        """Append + attention captured once in a CUDA graph, replayed for several steps."""
        if self.device.type != "cuda":
            return
        b, hq, hkv, n, d, dt = 2, 32, 8, 2048, 128, torch.bfloat16
        _, k, v = _qkv(b, 1, hkv, 1, n, d, dt, self.device, self.gen)
        keep = torch.rand(b, hkv, n, device=self.device) < 0.5
        cache = RaggedKVCache.from_dense(k, v, keep, max_new_tokens=8)
        q = torch.randn(b, hq, 1, d, device=self.device, dtype=dt)
        kn = torch.randn(b, hkv, 1, d, device=self.device, dtype=dt)
        vn = torch.randn_like(kn)
        out = torch.empty(b, 1, hq, d, device=self.device, dtype=dt)
        cache.append(kn, vn)  # warm-up (compiles, allocates the workspace)
        ragged_decode_attention(q, cache, out=out)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ragged_decode_attention(q, cache, out=out)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rows = (cache.offsets + cache.lengths).long()
            cache.k_buf.index_copy_(0, rows, kn.reshape(-1, d))
            cache.v_buf.index_copy_(0, rows, vn.reshape(-1, d))
            cache.lengths += 1
            ragged_decode_attention(q, cache, out=out)
        worst = 0.0
        for _ in range(3):
            kn.copy_(torch.randn_like(kn))
            vn.copy_(torch.randn_like(vn))
            q.copy_(torch.randn_like(q))
            graph.replay()
            cache._slack_host -= 1
            r = ragged_decode_attention(q, cache, backend="reference")
            worst = max(worst, rel(out, r))
        self.record("ragged cuda-graph replay (append + attention)", worst < TOL[dt], f"rel={worst:.2e}")

    def run(self, only=None):
        for fn in (self.plain, self.masked, self.stats, self.group, self.group_decode, self.masked_decode,
                   self.key_sets, self.ragged, self.ragged_graph):
            if only and fn.__name__ not in only:
                continue
            t = time.time()
            try:
                fn()
            except Exception as err:  # a crash is a failed check, with its message
                import traceback
                self.record(f"{fn.__name__} crashed", False, f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}")
            self.record(f"{fn.__name__} time", True, f"{time.time() - t:.1f}s")
        return self.results


def _bm_bn(q):
    from ..kernels.masked_attention import _pick_config
    bm, bn, _, _ = _pick_config(q.shape[-1], q.shape[2], q.device, "lists")
    return bm, bn


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "gpu"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = Checks(args.size, device).run(args.only)
    if args.json:
        print("JSON:" + json.dumps(res))
    else:
        for name, ok, detail in res:
            print(f"{'PASS' if ok else 'FAIL'}  {name:55s} {detail}")
    return 0 if all(ok for _, ok, _ in res) else 1


if __name__ == "__main__":
    sys.exit(main())
