"""Every JIT option of fastmlp lives here, so kernels never spell their own.

fastmath: the flag set is explicit. It lets LLVM reassociate sums (so loops
vectorise), contract multiply-adds into FMAs, use reciprocals and ignore the
sign of zero. It leaves out ``nnan`` and ``ninf`` so that NaN and inf still
propagate and a diverging run stays visible. It also leaves out ``afn``:
approximate ``exp``/``log`` would move results away from the NumPy oracle.

Determinism: a compiled function is the same machine code whatever the
thread count, and every parallel loop in fastmlp writes disjoint memory
either with a work partition fixed by the problem size (gradient tasks) or
with one whose cut no computed value depends on (forward_backward's parts,
one per thread, cut at the 4-row tiles that the kernels use anyway), so
results are bit-identical for 1 or N threads.

cache: compiled kernels are cached on disk (keyed on the CPU by Numba), so a
second process starts without compiling. Numba invalidates a cached function
only when its own source file changes, yet a function's machine code includes
the kernels it calls from other files: after editing kernels.py,
microkernel.py, fpenv.py, optimizers.py, heads.py or schedules.py, delete
fastmlp/__pycache__/*.nbi and *.nbc, or step.py's cached functions keep the
old kernels. The cache is
also keyed on the CPU name and features Numba compiles for, and so is every
choice microkernel.py makes (vector width, block shapes): to inspect another
CPU's code, set NUMBA_CPU_NAME (with NUMBA_CPU_FEATURES="" on a host that
lacks its features) and a NUMBA_CACHE_DIR of its own.

Signatures: a kernel compiles once per distinct tuple of argument types, and
each compile of a step kernel costs seconds. A constant argument (0, a
module's constant) is typed as that literal value and a `prange` index as an
unsigned integer, each a signature of its own: pass such integers as
np.int64(...). The training data reach the kernels as raw bytes
(buffers.Data), so the step compiles once per model dtype whatever the input
dtype and head.
"""
import numba

FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
CACHE = True

# A serial kernel: called from inside parallel loops, never parallel itself.
kernel = numba.njit(fastmath=FASTMATH, cache=CACHE, nogil=True, error_model="numpy")

# A serial kernel whose sums run in source order (no `reassoc`): for loops
# that vectorize without reordering, so that their results cannot depend on
# the function they are inlined into. LLVM compiles a kernel anew inside each
# caller, and with `reassoc` it may associate the same sum differently there.
ordered_kernel = numba.njit(fastmath=FASTMATH - {"reassoc"}, cache=CACHE, nogil=True,
                            error_model="numpy")

# A kernel that owns one `prange` region (both cores).
parallel_kernel = numba.njit(
    parallel=True, fastmath=FASTMATH, cache=CACHE, nogil=True, error_model="numpy"
)


def ready(dispatcher, args):
    """Whether calling dispatcher with args runs without compiling: machine
    code for their types is loaded already or waits in the disk cache for
    this CPU. (It reads Numba's private cache index; if that ever fails, the
    answer is False, so at worst the user is told of a compile that is
    quick.)"""
    try:
        signature = tuple(dispatcher.typeof_pyval(arg) for arg in args)
        if signature in dispatcher.overloads:
            return True
        magic = dispatcher.targetctx.codegen().magic_tuple()
        index = dispatcher._cache._cache_file._load_index()
        return any(key[0] == signature and key[1] == magic for key in index)
    except Exception:
        return False
