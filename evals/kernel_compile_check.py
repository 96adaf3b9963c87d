"""The kernels compiled for an H100 (sm_90) without a GPU: Triton's compiler down to ptxas. Two sets: every launch
the kernel entry points make on a 651-token prompt (kernel_host_cost.entry_point_calls on meta tensors, each launch
recorded with its arguments and constexprs instead of run: kernels 1-3 and 5 and kernel 3's decoding form, with the
flags their wrappers choose but the small tiles they pick off a GPU, so every kernel's code is compiled, not its GPU
tile sizes), and the decoding kernels at their GPU tiles (head_dim 64-256, one split or several, a key mask or none,
kernel 3's group counts and redistribution flags, kernel 4). The interpreter checks
(kernel_checks.py) run the kernels' arithmetic on the CPU but not the compiler; this catches what only the compiler
refuses.

    python -m vlm_efficient.evals.kernel_compile_check      # one line per specialization; exit status 1 on a failure
"""

from __future__ import annotations

import sys

import torch

from ..kernels import group_decode, key_sets, ragged_decode, split_decode

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size


def _signature(fn, types: dict, consts: dict) -> dict:
    """Triton's signature of `fn`: `types` for the named arguments, i32 for the other runtime ones."""
    return {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}


def compile_for_hopper(fn, types: dict, consts: dict, options: dict) -> int:
    """Compile one specialization; its shared memory in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=_signature(fn, types, consts),
                       constexprs={(fn.arg_names.index(name),): value for name, value in consts.items()})  # fmt: skip
    return triton.compile(source, target=GPUTarget(*TARGET), options=options).metadata.shared


_POINTER = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
            torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _type_of(value) -> str:
    """Triton's signature type of a runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for an argument of type {type(value).__name__}")


def launched_cases(n: int = 651, heads: int = 8, head_dim: int = 128):
    """(name, kernel, types, constexprs, options) of every distinct launch the kernel entry points make on one prompt of
    n tokens, recorded on meta tensors (kernel_host_cost: the launches stubbed)."""
    from . import kernel_host_cost as host_cost

    kernels = {name: value for module in host_cost.KERNEL_MODULES for name, value in vars(module).items()
               if name.endswith("_kernel") and type(value).__module__.startswith("triton.")}  # fmt: skip
    seen = set()
    with host_cost.stubbed_launches(stub_sdpa=True) as log:
        for entry, call in host_cost._meta_ready(n, heads, head_dim).items():
            log.clear()
            call()
            for name, _, args, meta in log:
                fn = kernels[name]
                names = fn.arg_names
                types = {names[i]: _type_of(arg) for i, arg in enumerate(args) if arg is not None}
                consts = {names[i]: None for i, arg in enumerate(args) if arg is None}
                consts.update({k: v for k, v in meta.items() if k not in _OPTIONS})
                options = {k: v for k, v in meta.items() if k in _OPTIONS}
                key = (name, tuple(sorted(types.items())), tuple(sorted(consts.items(), key=str)),
                       tuple(sorted(options.items())))  # fmt: skip
                if key not in seen:
                    seen.add(key)
                    yield f"{entry}: {name}", fn, types, consts, options


def cases():
    """(name, kernel, argument types, constexprs, launch options) of every checked specialization."""
    yield from launched_cases()
    decode = dict(num_warps=4, num_stages=4)
    for head_dim, direct, masked, logits in [(128, False, True, False), (128, True, True, False),
                                             (64, False, False, False), (80, False, True, False),
                                             (256, False, True, False), (128, False, True, True)]:  # fmt: skip
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        out = "*bf16" if direct else "*fp32"
        yield (f"kernel 5 d={head_dim} {'one split' if direct else 'splits'} {'mask' if masked else 'no mask'}"
               f"{' logits kept' if logits else ''}", split_decode._masked_decode_kernel,
               dict(Q="*bf16", K="*bf16", V="*bf16", VALID="*i8" if masked else "*bf16", O="*bf16", PO=out, PL=out,
                    LG="*fp32" if logits else "*bf16", qk_scale="fp32"),
               dict(HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_G=16, BLOCK_N=64, HAS_VALID=masked, DIRECT=direct,
                    KEEP_LOGITS=logits), decode)  # fmt: skip
    for lse in (False, True):
        yield (f"split merge d=128{' with LSE' if lse else ''}", split_decode._split_combine_kernel,
               dict(PO="*fp32", PL="*fp32", O="*bf16", LSE="*fp32" if lse else "*bf16"),
               dict(HEAD_D=128, BLOCK_D=128, BLOCK_G=16, WRITE_LSE=lse), dict(num_warps=4))
    yield ("kernel 5 head mean", split_decode._head_mean_kernel, dict(LG="*fp32", LSE="*fp32", OUT="*fp32"),
           dict(BLOCK_N=256), dict(num_warps=4))
    for block, evict in ((1024, True), (4096, True), (16384, False)):
        yield (f"kernel 6 A-VL key sets, {block} keys{' with eviction' if evict else ''}", key_sets._avl_step_kernel,
               dict(ATT="*fp32", SEC="*u8", CORE="*u8", SCORE="*fp32", EVICTED="*u8", PTEXT="*u8", VISUAL="*u8",
                    KEYS="*i64", MASK="*u8", STEP="*i64", BUDGET="*i64"),
               dict(EVICT=evict, BLOCK=block), dict(num_warps=8 if block > 2048 else 4))
    for direct in (True, False):
        yield (f"kernel 4 {'one split' if direct else 'splits'}", ragged_decode._ragged_split_kernel,
               dict(Q="*bf16", KB="*bf16", VB="*bf16", OFFS="*i32", LENS="*i32", O="*bf16", PO="*fp32", PL="*fp32",
                    qk_scale="fp32"),
               dict(HEAD_D=128, BLOCK_D=128, BLOCK_G=16, BLOCK_N=64, DIRECT=direct), decode)
    types = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", GRP="*i32", KBIAS="*fp32", KVALID="*u8", TAB="*fp32",
                 PO="*fp32", PL="*fp32", PM="*fp32", mass_min="fp32", ratio_min="fp32")
    for groups, post, direct, head_dim in [(3, False, False, 128), (3, True, False, 128), (4, True, True, 128),
                                           (2, False, False, 256), (3, True, False, 64)]:  # fmt: skip
        flags = dict(HAS_POST=post, MASS_BITS=6 if post else 0, HAS_RATIO=post, NUM_BITS=2 if post else 0,
                     DEN_BITS=6 if post else 0)
        shape = dict(HEAD_D=head_dim, BLOCK_D=head_dim, BLOCK_R=16, NG=groups)
        label = f"{groups} groups d={head_dim}{' redistributing' if post else ''}"
        yield (f"kernel 3 decoding form, {label}, {'one split' if direct else 'splits'}",
               group_decode._group_decode_kernel, types,
               dict(**shape, **flags, BLOCK_N=64, HAS_KBIAS=False, HAS_KVALID=True, PRE_ABS=not post, DIRECT=direct),
               dict(num_warps=4, num_stages=3))
        if not direct:
            yield (f"kernel 3 decoding merge, {label}", group_decode._group_merge_kernel,
                   dict(O="*bf16", TAB="*fp32", PO="*fp32", PL="*fp32", PM="*fp32", mass_min="fp32",
                        ratio_min="fp32"), dict(**shape, **flags), dict(num_warps=4))


def main() -> int:
    failed = 0
    for name, fn, types, consts, options in cases():
        try:
            print(f"ok    {name}: {compile_for_hopper(fn, types, consts, options)} bytes of shared memory", flush=True)
        except Exception as error:  # every specialization reports its own failure
            failed += 1
            print(f"FAIL  {name}: {type(error).__name__}: {str(error)[:800]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
