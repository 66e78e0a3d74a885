"""bfloat16 training (`dtype="bfloat16"`): where the products round, and
what the CPU offers.

A bfloat16 model keeps float32 master parameters, optimizer state, gradient
sums, biases, loss and head. What a layer's products read is rounded to
bfloat16 (round to nearest, ties to even) as it is written:

- the batch's input rows, as gather_rows copies them;
- the hidden layers' activations, as dense_forward writes them;
- the weights, into a rounded copy of the parameters (Network.operands)
  that the update kernels write next to each new value and that the
  transposed blocks are made from;
- the deltas, as the head and dense_backward_input write them.

Each product of two bfloat16 values is exact in float32 and the kernels sum
them in float32, so this is the arithmetic of `vdpbf16ps` and AMX tiles
(up to the order of their sums). The values stay in float32 buffers, low 16
bits zero: on every CPU the same results, at float32's speed or a little
below. `reference.py` rounds at the same places, with `round_array`.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# the CPU flags (Linux /proc/cpuinfo) of instructions that multiply bfloat16
NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


@intrinsic
def round_bfloat16(typingctx, x):
    # x rounded to the nearest bfloat16, ties to even, as a float of x's
    # type (NaN stays NaN; float64 goes through float32 first)
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        value = args[0]
        single = value if x.bitwidth == 32 else builder.fptrunc(value, f32)
        bits = builder.bitcast(single, i32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        bits = builder.add(bits, builder.add(ir.Constant(i32, 0x7FFF), odd))
        bits = builder.and_(bits, ir.Constant(i32, 0xFFFF0000))
        rounded = builder.bitcast(bits, f32)
        is_nan = builder.fcmp_unordered("uno", single, single)
        rounded = builder.select(is_nan, single, rounded)
        return rounded if x.bitwidth == 32 else builder.fpext(rounded, ir.DoubleType())
    return x(x), codegen


def round_array(a):
    """The oracle's rounding: float32 array a to the nearest bfloat16 (ties
    to even, NaN kept), as float32."""
    a = np.asarray(a, np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = bits.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), a, rounded)


def native_support():
    """The CPU flags of this machine that multiply bfloat16 natively (empty
    when it has none, or on a system without /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info
                          if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in NATIVE_FLAGS if flag in flags)
