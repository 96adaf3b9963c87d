"""The host side of the kernel entry points, with every Triton launch stubbed (evals/kernel_host_cost.py): once a layout's
caches are built, a call reads no tensor value on the host (what would wait for the GPU), and each call takes the
route its docstring promises (which launches; SDPA for the untouched tiles). No timing here: the benchmark's
"wrapper" and "host" sections report it."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from vlm_efficient.heads.pai import pai_groups  # noqa: E402
from vlm_efficient.heads.vaf import vaf_groups  # noqa: E402
from vlm_efficient.evals import kernel_host_cost as host_cost  # noqa: E402
from vlm_efficient.kernels.api import MaskSpec  # noqa: E402
from vlm_efficient.kernels.attention_stats import (  # noqa: E402
    attention_with_received_stats_triton,
    received_attention_triton,
)
from vlm_efficient.kernels.group_attention import group_attention_triton  # noqa: E402
from vlm_efficient.kernels.masked_attention import flash_attention_triton, masked_attention_triton  # noqa: E402

N, HEADS, HEAD_DIM = 96, 4, 64


def _inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, N, HEAD_DIM) for _ in range(3))
    key_valid = torch.ones(2, N, dtype=torch.bool)
    key_valid[1, :5] = False
    return q, k, v, key_valid


def _calls():
    """{name: (call, launches expected)}: every entry point, unpadded and padded where the route differs."""
    q, k, v, key_valid = _inputs()
    mask = host_cost.prompt_mask(N, MaskSpec.neighbor_window(1, 1))
    q1, k1, v1 = q[:1], k[:1], v[:1]
    groups = (torch.arange(N) % 3 == 1).long().expand(2, N).contiguous()
    last = torch.zeros(2, N, dtype=torch.bool)
    last[:, -1] = True
    rows = torch.tensor([[N - 1, 3], [N - 1, -1]])
    pai, vaf = pai_groups(HEADS, 0.5), vaf_groups(HEADS, [0.9, 1.2])
    vaf_two_heads = vaf_groups(HEADS, [0.9, 1.2], heads=[0, 2])
    scaling = HEAD_DIM ** -0.5
    forward, rows_pass = ["_attn_fwd_kernel"], ["_rows_logits_kernel", "_rows_finalize_kernel"]
    return {
        "K1 causal, padded": (lambda: flash_attention_triton(q, k, v, scaling=scaling, key_valid=key_valid),
                              forward),
        "K1 window mask": (lambda: masked_attention_triton(q1, k1, v1, mask=mask, scaling=scaling), forward),
        "K2 unpadded: SDPA + rows pass": (lambda: attention_with_received_stats_triton(
            q, k, v, scaling=scaling, stat_queries=rows), rows_pass),
        "K2 padded: forward + rows pass": (lambda: attention_with_received_stats_triton(
            q, k, v, scaling=scaling, stat_queries=rows, key_valid=key_valid, per_head="kv"), forward + rows_pass),
        "K2 mask: forward + rows pass": (lambda: attention_with_received_stats_triton(
            q1, k1, v1, scaling=scaling, stat_queries=rows[:1], mask=mask), forward + rows_pass),
        "K2 rows pass alone": (lambda: received_attention_triton(q, k, stat_queries=rows, scaling=scaling,
                                                                 key_valid=key_valid), rows_pass),
        "K3 PAI unpadded: SDPA + selected rows": (lambda: group_attention_triton(
            q, k, v, key_group=groups, spec=pai, scaling=scaling, query_select=last),
            ["_group_rows_kernel", "_group_rows_merge_kernel"]),
        "K3 VAF on two heads, every row: SDPA + group tiles": (lambda: group_attention_triton(
            q, k, v, key_group=groups, spec=vaf_two_heads, scaling=scaling),
            ["_group_fwd_kernel"]),
        "K3 PAI padded: forward + group tiles": (lambda: group_attention_triton(
            q, k, v, key_group=groups, spec=pai, scaling=scaling, query_select=last, key_valid=key_valid),
            forward + ["_group_fwd_kernel"]),
        "K3 VAF every tile: group kernel alone": (lambda: group_attention_triton(
            q, k, v, key_group=groups, spec=vaf, scaling=scaling, key_bias=torch.zeros(2, N)), ["_group_fwd_kernel"]),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_entry_point_reads_nothing_back_and_launches_its_route(name):
    call, expected = _calls()[name]
    with host_cost.stubbed_launches() as log:
        call()  # builds the per-layout caches (block lists, key tables): once per forward
        log.clear()
        with host_cost.forbid_host_sync():
            call()
    assert [entry[0] for entry in log] == expected


def test_forbid_host_sync_catches_a_read():
    """The guard the test above relies on does refuse a host read (and restores Tensor afterwards)."""
    t = torch.ones(2)
    with pytest.raises(AssertionError, match="host sync"):
        with host_cost.forbid_host_sync():
            t.sum().item()
    with pytest.raises(AssertionError, match="host sync"):
        with host_cost.forbid_host_sync():
            bool((t > 0).all())
    assert t.sum().item() == 2.0
    # and in an entry point that does read back: the fused column sums split more than 256 rows per query block
    q, k, v, _ = _inputs()
    many = torch.randint(0, N, (2, 300))
    with host_cost.stubbed_launches(), pytest.raises(AssertionError, match="host sync"):
        with host_cost.forbid_host_sync():
            attention_with_received_stats_triton(q, k, v, scaling=0.125, stat_queries=many, stats_impl="colsum")


def test_key_tables_built_once_per_key_group_tensor(monkeypatch):
    """Kernel 3's per-key inputs are reused while the same key-group tensor comes back, rebuilt for another tensor
    or after an in-place change."""
    ga = sys.modules["vlm_efficient.kernels.group_attention"]
    q, k, v, _ = _inputs()
    spec = pai_groups(HEADS, 0.5)
    groups = (torch.arange(N) % 3 == 1).long().expand(2, N).contiguous()
    built = []
    original = ga._per_key
    monkeypatch.setattr(ga, "_per_key", lambda tables, key_group: built.append(1) or original(tables, key_group))
    with host_cost.stubbed_launches():
        for _ in range(3):
            group_attention_triton(q, k, v, key_group=groups, spec=spec, scaling=0.125)
        assert len(built) == 1
        group_attention_triton(q, k, v, key_group=groups.clone(), spec=spec, scaling=0.125)
        assert len(built) == 2
        groups[0, 0] = 1 - groups[0, 0]
        group_attention_triton(q, k, v, key_group=groups, spec=spec, scaling=0.125)
        assert len(built) == 3


def test_launch_configs_come_from_the_data_file(monkeypatch):
    """configs.json: the card's own section first, then 'default'; per head_dim, then '*'; every kind the kernels
    ask for is in 'default' for every head_dim (tuned for 64 / 80 / 128, '*' for the others: the tiny test models'
    16 too, which the GPU tests route through kernel 1)."""
    configs = sys.modules["vlm_efficient.kernels.configs"]
    for kind in configs.KINDS:
        for head_dim in (16, 32, 64, 80, 96, 128, 256):
            assert configs._lookup(kind, head_dim, "some other GPU")
    table = {"default": {"k1_dense": {"128": [128, 64, 8, 3]}, "k3": {"*": [1, 2, 3, 4]}},
             "card": {"k1_dense": {"128": [64, 32, 4, 2]}}}
    monkeypatch.setattr(configs, "config_table", lambda: table)
    configs._lookup.cache_clear()
    try:
        assert configs._lookup("k1_dense", 128, "card") == (64, 32, 4, 2)
        assert configs._lookup("k1_dense", 128, "other") == (128, 64, 8, 3)
        assert configs._lookup("k3", 80, "card") == (1, 2, 3, 4)
        with pytest.raises(KeyError, match="head_dim 64"):
            configs._lookup("k1_dense", 64, "card")
        with pytest.raises(ValueError, match="kind"):
            configs._lookup("k9", 64, "card")
    finally:
        configs._lookup.cache_clear()


def test_inference_tensors_are_accepted_and_cached_while_they_live(monkeypatch):
    """Under torch.inference_mode (the eval runner's and bench's mode) the layout tensors count no versions: kernel 3
    takes them (it raised on `_version` before) and, as for plain tensors, builds its per-key inputs and row lists
    once per tensor, then reads nothing back on later calls."""
    ga = sys.modules["vlm_efficient.kernels.group_attention"]
    q, k, v, _ = _inputs()
    spec = pai_groups(HEADS, 0.5)
    built = []
    original = ga._per_key
    monkeypatch.setattr(ga, "_per_key", lambda tables, key_group: built.append(1) or original(tables, key_group))
    with torch.inference_mode(), host_cost.stubbed_launches():
        groups = (torch.arange(N) % 3 == 1).long().expand(2, N).contiguous()
        last = torch.zeros(2, N, dtype=torch.bool)
        last[:, -1] = True
        group_attention_triton(q, k, v, key_group=groups, spec=spec, scaling=0.125, query_select=last)
        with host_cost.forbid_host_sync():
            group_attention_triton(q, k, v, key_group=groups, spec=spec, scaling=0.125, query_select=last)
        assert groups.is_inference() and len(built) == 1
        group_attention_triton(q, k, v, key_group=groups.clone(), spec=spec, scaling=0.125, query_select=last)
        assert len(built) == 2


def _fake_kernel(x_ptr, n, scale, BLOCK=16, FLAG=False):  # the signature a fake JIT kernel carries
    pass


class _FakeCompiled:
    """A compiled kernel: its launcher records what it is handed."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, launches):
        self.launches = launches

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        self.launches.append(("bound", (grid_0, grid_1, grid_2), stream, args))


class _FakeJIT:
    """Stands in for a JITFunction: kernel[grid](*args, **meta) 'compiles' (a new compiled kernel) and launches."""

    device_caches: dict = {}

    def __init__(self):
        import inspect
        self.signature = inspect.signature(_fake_kernel)
        self.launches: list = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.launches.append(("triton", tuple(grid), args, meta))
            return _FakeCompiled(self.launches)
        return run


def test_a_bound_launch_skips_triton_only_for_a_specialization_it_has_launched(monkeypatch):
    """kernels/launch.py: the second call with the same specialization goes straight to the compiled kernel's launcher,
    with every argument in signature order (constexprs and defaults after the positional ones); a change in anything
    Triton specializes on (dtype, 16-byte alignment, an integer's divisibility by 16 or equality to 1, a constexpr, a
    launch option) goes through Triton again, and so does every call while a launch hook is set or where a constexpr
    is passed positionally."""
    from types import SimpleNamespace

    from vlm_efficient.kernels import launch as bound

    hooks = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(bound, "_HOOKS", hooks)
    monkeypatch.setattr(bound, "_DEVICE_AND_STREAM", (lambda: 0, lambda device: 1234))
    monkeypatch.setattr(bound, "_BOUND", {})
    kernel = _FakeJIT()
    x = torch.zeros(64)

    def routes():
        return [entry[0] for entry in kernel.launches]

    bound.launch(kernel, (4, 2), x, 32, 0.5, BLOCK=64, num_warps=4)
    bound.launch(kernel, (4, 2), torch.ones(64), 48, 0.25, BLOCK=64, num_warps=4)  # same specialization
    assert routes() == ["triton", "bound"]
    assert kernel.launches[1][1:3] == ((4, 2, 1), 1234)
    args = kernel.launches[1][3]
    assert args[1:] == (48, 0.25, 64, False) and torch.equal(args[0], torch.ones(64))
    for changed in [dict(args=(x, 33, 0.5)),  # not a multiple of 16
                    dict(args=(x, 1, 0.5)),  # equal to 1
                    dict(args=(x[1:], 32, 0.5)),  # 4 bytes off a 16-byte boundary
                    dict(args=(x.half(), 32, 0.5)),
                    dict(args=(x, 2**40, 0.5)),  # 64-bit
                    dict(args=(x, 32, 0.5), BLOCK=128),
                    dict(args=(x, 32, 0.5), FLAG=True),
                    dict(args=(x, 32, 0.5), num_warps=8)]:
        kernel.launches.clear()
        meta = {"BLOCK": 64, "num_warps": 4, **{k: v for k, v in changed.items() if k != "args"}}
        bound.launch(kernel, (4,), *changed["args"], **meta)
        bound.launch(kernel, (4,), *changed["args"], **meta)
        assert routes() == ["triton", "bound"], changed
        assert kernel.launches[1][3][3:] == (meta["BLOCK"], meta.get("FLAG", False))
    kernel.launches.clear()
    hooks.launch_enter_hook = SimpleNamespace(calls=[])  # Triton >= 3.6: an empty HookChain is always there
    bound.launch(kernel, (4, 2), x, 32, 0.5, BLOCK=64, num_warps=4)
    assert routes() == ["bound"]
    kernel.launches.clear()
    hooks.launch_enter_hook.calls.append(print)  # a profiler's hook: Triton calls it, so every launch goes through it
    bound.launch(kernel, (4, 2), x, 32, 0.5, BLOCK=64, num_warps=4)
    hooks.launch_enter_hook = print  # the same with a plain function (Triton < 3.6)
    bound.launch(kernel, (4, 2), x, 32, 0.5, BLOCK=64, num_warps=4)
    assert routes() == ["triton", "triton"]
    hooks.launch_enter_hook = None
    with pytest.raises(TypeError, match="no specialization key"):
        bound.launch(kernel, (4,), [1, 2], 32, 0.5, BLOCK=64, num_warps=4)
    kernel.launches.clear()  # a constexpr passed positionally: Triton compiles one per value, so it is never bound
    kernel.params = [SimpleNamespace(is_constexpr=name == "n") for name in kernel.signature.parameters]
    bound._BOUND.clear()
    for n in (32, 48):
        bound.launch(kernel, (4,), x, n, 0.5, BLOCK=64, num_warps=4)
    assert routes() == ["triton", "triton"]
    kernel.launches.clear()
    monkeypatch.delattr(_FakeJIT, "device_caches")  # the interpreter's kernels (TRITON_INTERPRET=1) launch through it
    bound.launch(kernel, (4, 2), x, 32, 0.5, BLOCK=64, num_warps=4)
    assert routes() == ["triton"]
