"""A one-program kernel applying triton_common.log64 (checked by test_fast_engine.check_log64;
Triton resolves a kernel's helpers from its module's globals, so it lives in a module of its own)."""

import triton
import triton.language as tl

from optimal_sampling.engines.fast.triton_common import log64


@triton.jit
def apply_log64(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, log64(tl.load(x_ptr + i)))
