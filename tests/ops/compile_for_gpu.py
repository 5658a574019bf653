"""Compile attnkit's Triton kernels for an H100/H200 (sm_90) without a GPU; print one line
each, `<kernel>: ok <shared memory bytes> <limit>` or `<kernel>: FAILED <why>`.

Run in a process of its own with TRITON_INTERPRET unset (under the interpreter `triton.jit`
returns interpreted functions, which do not compile). Triton's compiler and its bundled
ptxas need no device, so the kernels' GPU code is checked in CI: what the interpreter
accepts but the compiler would reject (types, shapes, control flow) fails here, and so does
a launch setting that asks for more shared memory than the GPUs it is meant for hold.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnkit.ops import triton_latent, triton_paged, triton_prefill

TARGET = GPUTarget("cuda", 90, 32)
# Shared memory a kernel may ask for per block: 99 KB, the least a recent GPU offers (RTX
# 30/40 series); float32 past head dim 128 needs an A100 or H100 (the backend refuses it
# on smaller GPUs).
SMALL_GPU = 101_376
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_kernel(fn, pointers: dict, constexprs: dict, warps: int, stages: int) -> int:
    """Shared memory bytes per block of the compiled kernel."""
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    indexed = {(names.index(n),): value for n, value in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=indexed)
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(source, target=TARGET, options=options).metadata.shared


def prefill_cases():
    grid = itertools.product(("bf16", "fp16", "fp32"), (0, 1), (0, 1), (128, 256))
    for dtype, masked, sparse, head_dim in grid:
        pointers = {n: f"*{dtype}" for n in ("Q", "K", "V", "OUT")} | {
            "LSE": "*fp32",
            "TILES": "*i32",
            "COUNTS": "*i32",
            "LAYOUT": "*i8",
            "qk_scale": "fp32",
        }
        settings = triton_prefill.launch_settings(TORCH_DTYPES[dtype], head_dim)
        constexprs = dict(
            GROUP=4,
            MASKED=bool(masked),
            SPARSE=bool(sparse),
            BLOCK_M=settings["block_m"],
            BLOCK_N=settings["block_n"],
            HEAD_DIM=head_dim,
            V_DIM=head_dim,
            BLOCK_D=head_dim,
            BLOCK_DV=head_dim,
            EXACT=dtype == "fp32",
        )
        wide = dtype == "fp32" and head_dim > 128
        limit = triton_prefill.FLOAT32_WIDE_SHARED_BYTES if wide else SMALL_GPU
        name = f"prefill {dtype} d{head_dim} masked={masked} sparse={sparse}"
        kernel, warps, stages = triton_prefill._prefill_forward, *settings_of(settings)
        yield name, kernel, pointers, constexprs, warps, stages, limit


def settings_of(settings: dict) -> tuple[int, int]:
    return settings["num_warps"], settings["num_stages"]


def latent_cases():
    for dtype in ("bf16", "fp32"):
        pointers = {n: f"*{dtype}" for n in ("Q_LAT", "Q_ROPE", "LATENT", "K_ROPE")}
        pointers |= {"LENGTHS": "*i32", "OUT": "*fp32", "LSE": "*fp32", "qk_scale": "fp32"}
        wide = dtype == "fp32"  # the launch settings triton_latent_decode picks
        block_n, stages = (16, 1) if wide else (triton_latent.BLOCK_N, triton_latent.NUM_STAGES)
        constexprs = dict(
            RANK=512, ROPE=64, BLOCK_H=16, BLOCK_N=block_n, BLOCK_R=512, BLOCK_P=64, EXACT=wide
        )
        kernel, warps = triton_latent._latent_decode_split, triton_latent.NUM_WARPS
        yield f"latent decode {dtype}", kernel, pointers, constexprs, warps, stages, SMALL_GPU


def paged_cases():
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
    kernel, warps, stages = (
        triton_paged._paged_decode_split,
        triton_paged.NUM_WARPS,
        triton_paged.NUM_STAGES,
    )
    yield "paged decode bf16", kernel, pointers, constexprs, warps, stages, SMALL_GPU
    pointers = {"OUT_PARTS": "*fp32", "LSE_PARTS": "*fp32", "OUT": "*bf16", "LSE": "*fp32"}
    merge = dict(V_DIM=128, BLOCK_S=8, BLOCK_DV=128)
    yield "merge splits", triton_paged._merge_splits, pointers, merge, 4, 2, SMALL_GPU


def main() -> None:
    for name, fn, pointers, constexprs, warps, stages, limit in itertools.chain(
        prefill_cases(), latent_cases(), paged_cases()
    ):
        try:
            shared = compile_kernel(fn, pointers, constexprs, warps, stages)
            print(f"{name}: ok {shared} {limit}", flush=True)
        except Exception as error:  # report every kernel, not just the first failure
            print(f"{name}: FAILED {type(error).__name__}: {error}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
