"""Compile attnkit's Triton kernels for an H100/H200 (sm_90) without a GPU; print one line
each, `<kernel>: ok` or `<kernel>: FAILED <why>`.

Run in a process of its own with TRITON_INTERPRET unset (under the interpreter `triton.jit`
returns interpreted functions, which do not compile). Triton's compiler and its bundled
ptxas need no device, so the kernels' GPU code is checked in CI: what the interpreter
accepts but the compiler would reject (types, shapes, control flow) fails here.
"""

from __future__ import annotations

import inspect
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnkit.ops import triton_latent, triton_paged, triton_prefill

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, pointers: dict, constexprs: dict, warps: int, stages: int) -> None:
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    indexed = {(names.index(n),): value for n, value in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=indexed)
    triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def cases():
    for dtype, masked, sparse in itertools.product(("bf16", "fp16", "fp32"), (0, 1), (0, 1)):
        pointers = {n: f"*{dtype}" for n in ("Q", "K", "V", "OUT")} | {
            "LSE": "*fp32",
            "TILES": "*i32",
            "COUNTS": "*i32",
            "LAYOUT": "*i8",
            "qk_scale": "fp32",
        }
        constexprs = dict(
            GROUP=4,
            MASKED=bool(masked),
            SPARSE=bool(sparse),
            BLOCK_M=triton_prefill.BLOCK_M,
            BLOCK_N=triton_prefill.BLOCK_N,
            HEAD_DIM=128,
            V_DIM=128,
            BLOCK_D=128,
            BLOCK_DV=128,
            EXACT=dtype == "fp32",
        )
        name = f"prefill {dtype} masked={masked} sparse={sparse}"
        yield name, triton_prefill._prefill_forward, pointers, constexprs, triton_prefill
    for dtype in ("bf16", "fp32"):
        pointers = {n: f"*{dtype}" for n in ("Q_LAT", "Q_ROPE", "LATENT", "K_ROPE")}
        pointers |= {"LENGTHS": "*i32", "OUT": "*fp32", "LSE": "*fp32", "qk_scale": "fp32"}
        constexprs = dict(
            RANK=512, ROPE=64, BLOCK_H=16, BLOCK_N=32, BLOCK_R=512, BLOCK_P=64, EXACT=False
        )
        constexprs["EXACT"] = dtype == "fp32"
        yield (
            f"latent decode {dtype}",
            triton_latent._latent_decode_split,
            pointers,
            constexprs,
            (triton_latent),
        )
    pointers = {n: "*bf16" for n in ("Q", "K", "V")} | {
        "TABLE": "*i32",
        "LENGTHS": "*i32",
        "OUT": "*fp32",
        "LSE": "*fp32",
        "scale": "fp32",
    }
    constexprs = dict(
        GROUP=4, BLOCK_G=16, BLOCK_N=64, HEAD_DIM=128, V_DIM=128, BLOCK_D=128, BLOCK_DV=128,
        PAGE=16, EXACT=False,
    )  # fmt: skip
    yield "paged decode bf16", triton_paged._paged_decode_split, pointers, constexprs, triton_paged
    pointers = {"OUT_PARTS": "*fp32", "LSE_PARTS": "*fp32", "OUT": "*bf16", "LSE": "*fp32"}
    yield (
        "merge splits",
        triton_paged._merge_splits,
        pointers,
        dict(V_DIM=128, BLOCK_S=8, BLOCK_DV=128),
        triton_paged,
    )


def main() -> None:
    for name, fn, pointers, constexprs, module in cases():
        warps = getattr(module, "NUM_WARPS", 4)
        stages = getattr(module, "NUM_STAGES", 2)
        try:
            compile_kernel(fn, pointers, constexprs, warps, stages)
            print(f"{name}: ok", flush=True)
        except Exception as error:  # report every kernel, not just the first failure
            print(f"{name}: FAILED {type(error).__name__}: {error}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
