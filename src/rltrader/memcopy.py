"""Memory intrinsics for numba kernels compiled without numba's runtime: ``copy_block`` and ``prefetch``.

``copy_block`` is ``llvm.memcpy``. In such a kernel (``_nrt=False``, see ``env.core``) a slice-to-slice copy
(``dst[a:b] = src[c:d]``) does not compile — numba may stage it through a temporary, which needs the runtime —
and an element loop measured ~3.5× slower than ``memcpy`` for an observation window (30 × 23 float32, 2.8 KB):
514 vs 146 µs for B = 1024 windows. (Prefetching the next windows in that gather gained nothing measurable: it
runs at the machine's copy bandwidth already.)

``prefetch`` is ``llvm.prefetch``: a hint, no value changes, it cannot fault. The batch env steps B accounts,
each at its own row of the market data; every step 1/length of them start a new, random session, so their bars
and session-table rows are cold (DRAM) lines, and the step loop was a chain of cache misses the CPU could not
overlap — one account's body is longer than the out-of-order window, so it never reaches the next account's
loads early. Requesting account b + D's lines while account b computes overlaps them (measured 287 → 195 ns per
account step at B = 1024 with new sessions drawn as ``BatchSessionEnv.step`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _address(context: Any, builder: Any, aty: Any, arr: Any, ity: Any, i: Any) -> Any:
    """The address of flat element ``i`` of the contiguous array ``arr`` (no bounds check)."""
    a = context.make_array(aty)(context, builder, value=arr)
    idx = context.cast(builder, i, ity, types.intp)
    return builder.gep(a.data, [idx])


@intrinsic
def _copy_block(typingctx: Any, dst: Any, d0: Any, src: Any, s0: Any, n: Any) -> Any:
    """``dst.flat[d0:d0 + n] = src.flat[s0:s0 + n]`` by ``llvm.memcpy``: both C-contiguous, same dtype, no
    overlap and no bounds check (the caller's indices are in range)."""
    ok = (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype
          and dst.layout == "C" and src.layout == "C" and all(isinstance(x, types.Integer) for x in (d0, s0, n)))
    if not ok:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        at = signature.args
        dp = _address(context, builder, at[0], args[0], at[1], args[1])
        sp = _address(context, builder, at[2], args[2], at[3], args[3])
        count = context.cast(builder, args[4], at[4], types.intp)
        size = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(at[0].dtype)))
        cgutils.raw_memcpy(builder, dp, sp, count, size)  # type: ignore[no-untyped-call]
        return context.get_dummy_value()

    return types.void(dst, d0, src, s0, n), codegen


@intrinsic
def _prefetch(typingctx: Any, arr: Any, i: Any) -> Any:
    """``llvm.prefetch`` (read, keep in all cache levels) of ``arr[i]``, ``arr`` 1-d with any stride (no bounds
    check: a prefetch of any address is harmless)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(i, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        a = context.make_array(signature.args[0])(context, builder, value=args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        stride = builder.extract_value(a.strides, 0)
        addr = builder.add(builder.ptrtoint(a.data, cgutils.intp_t), builder.mul(idx, stride))
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")  # type: ignore[no-untyped-call]
        builder.call(fn, [builder.inttoptr(addr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


copy_block = cast(Callable[[np.ndarray, int, np.ndarray, int, int], None], _copy_block)
"""``copy_block(dst, d0, src, s0, n)`` inside a numba kernel (the intrinsic, typed for callers)."""
prefetch = cast(Callable[[np.ndarray, int], None], _prefetch)
"""``prefetch(a, i)`` inside a numba kernel (the intrinsic, typed for callers)."""
