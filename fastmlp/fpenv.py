"""Flush-to-zero for the compute threads: no subnormal slowdown.

A float below the smallest normal number (1.2e-38 in float32, 2.2e-308 in
float64) is subnormal, and many x86 cores (Intel's most of all) take a
microcode assist of about a hundred cycles for every operation that reads or
makes one. A diverging fit (a too-large learning rate saturates sigmoids, so
deltas shrink towards zero) can make them by the million: 44x slower steps
were measured on an Intel Xeon.

Every parallel region of fastmlp therefore runs with the SSE control bits
FTZ (results that would be subnormal become 0) and DAZ (subnormal inputs
count as 0) set, and restores the thread's previous bits when it ends, so
NumPy and everything else on the same threads keep IEEE semantics.
Numerically, values below the smallest normal number become 0; nothing
else changes (the oracle tests pass unchanged).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import kernel

FLUSH_TO_ZERO = np.uint32(0x8000)  # MXCSR.FTZ
DENORMALS_ARE_ZERO = np.uint32(0x0040)  # MXCSR.DAZ


def is_x86(context):
    triple = context.codegen()._llvm_module.triple
    return triple.startswith(("x86_64", "i386", "i686"))


def mxcsr_call(builder, name, slot):
    # llvm.x86.sse.stmxcsr / ldmxcsr on the 4 bytes at `slot`
    byte_pointer = ir.IntType(8).as_pointer()
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer]), name)
    builder.call(function, [builder.bitcast(slot, byte_pointer)])


@intrinsic
def read_fp_control(typingctx):
    # the thread's MXCSR (0 where the target is not x86)
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        if not is_x86(context):
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def write_fp_control(typingctx, bits):
    # sets the thread's MXCSR to `bits` (nothing where the target is not x86)
    def codegen(context, builder, signature, args):
        if is_x86(context):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    return types.void(types.uint32), codegen


@kernel
def flush_subnormals():
    """Sets FTZ and DAZ on this thread; returns the bits to restore with
    write_fp_control when the parallel region's work is done."""
    saved = read_fp_control()
    write_fp_control(saved | (FLUSH_TO_ZERO | DENORMALS_ARE_ZERO))
    return saved
