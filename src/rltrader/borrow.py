"""Borrowed array views for the numba kernels: the same array without its reference count.

numba reference-counts every array variable with atomic increments and decrements on the array's ``MemInfo``.
The step kernels bind a dozen arrays per account (each inlined helper's arguments and ``k.acct``-style fields),
and LLVM's refcount pruning cannot remove the pairs across the kernels' branchy bodies: measured with ``perf``
on the batch step, ~25 % of the samples sat on the two ``lock`` instructions of ``NRT_incref`` / ``NRT_decref``
and more on the stalls right after them.

``borrow(a)`` returns a copy of the array's struct with a NULL ``MemInfo``: ``NRT_incref`` / ``NRT_decref`` then
return at their NULL check, no atomic. Safe because the kernel's caller holds the real arrays (its arguments)
for the whole call and nothing in the kernels stores an array anywhere that outlives it. Values are untouched:
the data pointer, shape and strides are the original's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _borrow(typingctx: Any, arr: Any) -> Any:
    """``arr`` itself (same data, shape, strides and type) without reference counting (module docstring)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        src = context.make_array(arr)(context, builder, value=args[0])
        src.meminfo = cgutils.get_null_value(src.meminfo.type)  # type: ignore[no-untyped-call]
        src.parent = cgutils.get_null_value(src.parent.type)  # type: ignore[no-untyped-call]
        return src._getvalue()

    return arr(arr), codegen


borrow = cast(Callable[[np.ndarray], np.ndarray], _borrow)
"""``borrow(a)`` inside a numba kernel (the intrinsic, typed for callers)."""
