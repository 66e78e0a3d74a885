"""Barriers between the phases of one parallel region.

A step of training runs several phases in turn (the layers forward and
back, then the gradients and the update), and each needs the whole of the
one before. Run as one parallel region each, every phase pays for starting
the threads and for joining them: 7-10 us a region on a 2-core Xeon, where
W1's whole step takes about 100 us. `step.fused_steps` instead runs every
phase of many steps in one region, with a spin barrier between phases.

A spin barrier waits for the other threads by reading memory, so it
deadlocks if two parts of the region run one after the other on one thread:
the first would wait for the second, which cannot start. Numba does that
when its threads are busy (a region inside another region runs on one
thread; TBB may run parts in turn). So the region starts with a barrier
that can give up (`all_started`): a part that has waited `START_TIMEOUT_CYCLES`
for the others marks the region aborted, and every part, the late ones
too, then returns before doing any work; the caller runs the steps in
regions of their own instead. Once every part is waiting at that barrier,
each runs on a thread of its own, and the later barriers (`arrive`, then
`end_barrier`) wait for as long as it takes.

A barrier's state is a few int64 words of one array (`make_sync`), each on
a cache line of its own. Its atomic operations are LLVM's (`lock xadd`,
`lock cmpxchg` and plain loads and stores on x86, whose stores are seen in
order): writes made before a barrier are seen by every part after it.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .balance import cycles
from .fpenv import is_x86
from .jit import kernel

# the words of a sync array, a cache line apart: START counts the parts that
# reached `all_started` (ABORTED once one gave up); COUNT the parts at the current
# barrier; GENERATION the barriers released so far
LINE = 8
START, COUNT, GENERATION = 0, LINE, 2 * LINE
SYNC_WORDS = 3 * LINE
ABORTED = -1
# how long a part waits in `all_started` before it gives the region up: 2 ms at
# 2.6 GHz, where parts start 2-4 us apart, and a thread that slept after a
# long pause wakes in well under 100 us (Xeon under KVM, measured)
START_TIMEOUT_CYCLES = 5_000_000


def make_sync():
    """A region's barrier state, all zero."""
    return np.zeros(SYNC_WORDS, np.int64)


def element_pointer(context, builder, signature, args):
    # the address of args[0][args[1]], a C-contiguous int64 array
    array_type = signature.args[0]
    array = context.make_array(array_type)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])


def check_int64_array(array):
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        raise TypeError("a sync array is a 1-D int64 array")


@intrinsic
def atomic_load(typingctx, array, index):
    # array[index], read with acquire order
    check_int64_array(array)

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature, args)
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(array, types.int64), codegen


@intrinsic
def atomic_store(typingctx, array, index, value):
    # array[index] = value, with release order
    check_int64_array(array)

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature, args)
        builder.store_atomic(args[2], pointer, "release", 8)
        return context.get_dummy_value()
    return types.void(array, types.int64, types.int64), codegen


@intrinsic
def atomic_add(typingctx, array, index, value):
    # array[index] += value, at once; returns the value before
    check_int64_array(array)

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")
    return types.int64(array, types.int64, types.int64), codegen


@intrinsic
def compare_exchange(typingctx, array, index, expected, value):
    # array[index] = value if it holds `expected`, at once; whether it did
    check_int64_array(array)

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature, args)
        result = builder.cmpxchg(pointer, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(result, 1)
    return types.boolean(array, types.int64, types.int64, types.int64), codegen


@intrinsic
def spin_pause(typingctx):
    # x86's `pause`: a spinning thread yields the core's pipeline to its
    # sibling and leaves the spin without a memory-order flush (nothing
    # where the target is not x86)
    def codegen(context, builder, signature, args):
        if is_x86(context):
            pause = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()
    return types.void(), codegen


@kernel
def all_started(sync, parts, timeout):
    # Every part of a region calls this first. True: all `parts` parts are
    # here, each on a thread of its own, and later barriers are safe. False:
    # the region is aborted (a part waited `timeout` cycles, or came after
    # one gave up); the part must return at once, having done nothing.
    while True:
        count = atomic_load(sync, START)
        if count == ABORTED:
            return False
        if compare_exchange(sync, START, count, count + 1):
            break
    if count + 1 == parts:
        return True
    began = cycles()
    while True:
        count = atomic_load(sync, START)
        if count == parts:
            return True
        if count == ABORTED:
            return False
        if cycles() - began > timeout and compare_exchange(sync, START, count, ABORTED):
            return False
        spin_pause()


@kernel
def arrive(sync, parts):
    # A part reaching a barrier: (whether it is the last of the `parts`,
    # the barrier's generation). The last one does the barrier's serial
    # work, if any, then calls release; the others call wait.
    generation = atomic_load(sync, GENERATION)
    last = atomic_add(sync, COUNT, 1) == parts - 1
    return last, generation


@kernel
def release(sync, generation):
    # the last part at a barrier lets the others go on
    atomic_store(sync, COUNT, 0)
    atomic_store(sync, GENERATION, generation + 1)


@kernel
def wait(sync, generation):
    # until the barrier of this generation is released
    while atomic_load(sync, GENERATION) == generation:
        spin_pause()


@kernel
def end_barrier(sync, last, generation):
    # after a part's arrive (and the last part's serial work): the last
    # part lets the others go on, the others wait for it
    if last:
        release(sync, generation)
    else:
        wait(sync, generation)


@kernel
def barrier(sync, parts):
    # every part waits here until all `parts` have come
    last, generation = arrive(sync, parts)
    end_barrier(sync, last, generation)
