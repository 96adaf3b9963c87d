"""What the last forward/generate of a wrapped model (in the calling thread) cost: tokens per layer, KV-cache bytes,
estimated FLOPs."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RunStats:
    methods: str
    has_visual: bool  # False: the prompt had no visual tokens and every method was a no-op
    batch_size: int
    prompt_tokens: list[int]  # real (non-padding) prompt tokens per sample
    visual_tokens: list[int]  # visual tokens per sample before any pruning
    tokens_per_layer: list[float]  # real rows entering each decoder layer at prefill, mean over samples
    visual_tokens_per_layer: list[float]
    tokens_per_layer_per_sample: list[list[int]]
    average_tokens: float  # mean of tokens_per_layer over layers
    kv_cache_bytes_per_layer: list[int]  # allocated KV cache after the call, all samples (incl. padding slots)
    kv_cache_bytes: int
    prefill_flops: dict[str, float]  # attention (projections + scores), mlp, total
    decode_steps: int
    decode_flops: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        per_layer = " ".join(f"{t:g}" for t in self.tokens_per_layer)
        return (
            f"tokens per layer: {per_layer} (avg {self.average_tokens:.1f}); visual per layer: "
            f"{' '.join(f'{t:g}' for t in self.visual_tokens_per_layer)}; KV cache {self.kv_cache_bytes / 2**20:.2f} MiB; "
            f"prefill {self.prefill_flops['total'] / 1e9:.3f} GFLOP"
        )


def _layer_flops(config, rows: float, keys_sum: float) -> tuple[float, float]:
    """FLOPs of one decoder layer: `rows` query rows, `keys_sum` = sum over rows of the keys each row attends to."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    projections = 2 * rows * hidden * (heads + 2 * kv_heads) * head_dim + 2 * rows * heads * head_dim * hidden
    scores = 4 * heads * head_dim * keys_sum  # QK^T and PV
    mlp = 6 * rows * hidden * config.intermediate_size  # gated MLP: gate, up, down
    return projections + scores, mlp


def compute_stats(engine) -> RunStats:
    # the calling thread's last call; a thread that made none (generate() ran in a worker) gets the latest of any
    run = engine.run if engine.run is not None else engine.latest_run
    if run is None:
        raise RuntimeError("no forward has run since wrap(): call the model or generate() first")
    config = engine.text_config
    layout = run.layout
    batch = layout.batch_size
    per_sample = [[int(v) for v in t.tolist()] for t in run.tokens_per_layer]
    tokens = [sum(s) / batch for s in per_sample]
    visual = [float(t.float().mean()) for t in run.visual_per_layer]

    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(engine.model.parameters()).element_size()
    new_tokens = run.attention_mask_2d.shape[1] - run.prompt_length
    kv_bytes = []
    attention_flops = mlp_flops = 0.0
    decode_attention = decode_mlp = 0.0
    for idx in range(engine.num_layers):
        positions = run.layer_positions.get(idx)
        width = run.prompt_length if positions is None else positions.shape[1]
        ragged = run.ragged.get(idx)
        if ragged is not None:  # a per-head pruned cache: its buffers, and the keys a head attends to in decoding
            kv_bytes.append(ragged.allocated_bytes())
        else:
            kv_bytes.append(batch * (width + new_tokens) * 2 * kv_heads * head_dim * element)
        for n in per_sample[idx]:
            attn, mlp = _layer_flops(config, n, n * (n + 1) / 2)
            attention_flops += attn
            mlp_flops += mlp
            # decode step t attends to the n kept prompt keys plus t generated ones
            steps = run.decode_steps
            cached = n if ragged is None else ragged.kept_keys
            attn, mlp = _layer_flops(config, steps, steps * cached + steps * (steps + 1) / 2)
            decode_attention += attn
            decode_mlp += mlp
    if run.allocated_kv_bytes is not None:  # static buffers (fast path, HF's static cache), as allocated
        kv_bytes = list(run.allocated_kv_bytes)
    return RunStats(
        methods="+".join(m.spec() for m in engine.methods),
        has_visual=layout.has_visual,
        batch_size=batch,
        prompt_tokens=[int(v) for v in layout.valid.sum(1).tolist()],
        visual_tokens=[int(v) for v in layout.num_visual.tolist()],
        tokens_per_layer=tokens,
        visual_tokens_per_layer=visual,
        tokens_per_layer_per_sample=[list(col) for col in zip(*per_sample)],
        average_tokens=sum(tokens) / len(tokens),
        kv_cache_bytes_per_layer=kv_bytes,
        kv_cache_bytes=sum(kv_bytes),
        prefill_flops={"attention": attention_flops, "mlp": mlp_flops, "total": attention_flops + mlp_flops},
        decode_steps=run.decode_steps,
        decode_flops={"attention": decode_attention, "mlp": decode_mlp, "total": decode_attention + decode_mlp},
    )
