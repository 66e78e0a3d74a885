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
second process starts without compiling. Numba stamps a cached function with
its own source file only, yet its machine code holds the kernels and
constants it uses from other files: step.py's `train_steps` cached before an
edit of kernels.py would keep the old kernels (seen: a stale cache made every
fit fail with "total size of new array must be unchanged"). So fastmlp's
functions are stamped with a digest of every source file of the package
(PackageCache): any change to the package, a `git checkout` or an upgrade,
recompiles them all, in the same directories Numba would use. (Imported from
a zip archive, or frozen into an application, they keep Numba's stamp of the
archive or the executable, which holds the whole package.) The cache is
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
import functools
import hashlib
import os
import sys

import numba
from numba._dispatcher import compute_fingerprint
from numba.core import caching

FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
# the same without `reassoc`: arithmetic in source order (ordered_kernel, expf)
ORDERED_FASTMATH = FASTMATH - {"reassoc"}
CACHE = True
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def package_digest(directory=PACKAGE_DIR):
    """SHA-256 of the names and contents of the package's .py files: the
    source stamp of every cached fastmlp function (read once a process)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), "rb") as source:
                digest.update(name.encode() + b"\0" + source.read() + b"\0")
    return digest.digest()


class PackageStamp:
    """Locator mixin: a function's cache is fresh while the package is
    unchanged, not only its own file. (In a frozen application, Numba's
    stamp of the executable, which holds the whole package.)"""

    def get_source_stamp(self):
        if getattr(sys, "frozen", False):
            return super().get_source_stamp()
        return package_digest()


class PackageCacheImpl(caching.CompileResultCacheImpl):
    # Numba's own places for the cache (NUMBA_CACHE_DIR, else __pycache__,
    # else the user's cache directory), each with the package's stamp; for
    # a package imported from a zip archive, Numba's stamp of the archive
    # (which any change to the package changes too)
    _locator_classes = [
        *(type(f"Package{locator.__name__}", (PackageStamp, locator), {})
          for locator in (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                          caching.UserWideCacheLocator)),
        caching.ZipCacheLocator,
    ]

    def reduce(self, cres):
        # with the kernels whose code it calls without a copy of its own
        # (link_as_compiled_pipeline), and the symbols its code defines
        # (loaded_lazily)
        return (getattr(cres.library, "calls", ()), defined_symbols(cres.library),
                super().reduce(cres))

    def rebuild(self, target_context, payload):
        calls, symbols, compiled = payload
        load_calls(calls, target_context)
        codegen = target_context.codegen()
        codegen.unserialize_library = functools.partial(loaded_lazily, codegen, symbols)
        try:
            return super().rebuild(target_context, compiled)
        finally:
            del codegen.unserialize_library  # (Numba's method again)


def defined_symbols(library):
    """The names that a compiled library's code defines, as Numba's JIT
    records them when it loads the library from the cache."""
    module = library._get_module_for_linking()
    return tuple(value.name for values in (module.functions, module.global_variables)
                 for value in values if not value.is_declaration)


def lazy_linking_library():
    """A Numba code library, loaded from the cache, that parses the LLVM
    bitcode kept with its machine code (for a later compile to link in)
    only when a compile asks for it; None where this Numba lacks the
    internals it takes."""
    try:
        import llvmlite.binding as llvm
        from numba.core.codegen import JITCodeLibrary
    except ImportError:
        return None

    class LazyLinkingLibrary(JITCodeLibrary):
        bitcode = None

        @property
        def _shared_module(self):
            if self.bitcode is not None:
                self.__dict__["parsed"] = llvm.parse_bitcode(self.bitcode)
                self.bitcode = None
            return self.__dict__.get("parsed")

        @_shared_module.setter
        def _shared_module(self, module):
            self.__dict__["parsed"] = module
    return LazyLinkingLibrary


LAZY_LINKING_LIBRARY = lazy_linking_library()


def loaded_lazily(codegen, symbols, state):
    """Numba's unserialize_library for a library of machine code from the
    cache, but for two costs that a process which only runs the code never
    needs: parsing the bitcode kept beside it, and walking that bitcode for
    the symbols it defines (given instead: defined_symbols, at the save).
    Loading the lesson's kernels took 0.165 s, 0.136 s of it those two
    (Zen 3, measured). Other libraries load as Numba loads them."""
    name, kind, data = state
    engine = getattr(codegen, "_engine", None)
    if kind != "object" or LAZY_LINKING_LIBRARY is None or \
            not isinstance(getattr(engine, "_defined_symbols", None), set):
        return type(codegen).unserialize_library(codegen, state)
    object_code, bitcode = data
    library = LAZY_LINKING_LIBRARY(codegen, name)
    library.enable_object_caching()
    library._set_compiled_object(object_code)
    library.bitcode = bitcode
    library._finalize_final_module()
    engine._defined_symbols.update(symbols)
    return library


class CallsMissing(Exception):
    """A cached function calls code that this process cannot load."""


class PackageCache(caching.FunctionCache):
    _impl_class = PackageCacheImpl

    def load_overload(self, sig, target_context):
        # (a function with a callee this process cannot load compiles again)
        try:
            return super().load_overload(sig, target_context)
        except CallsMissing:
            return None


NO_CACHE_WARNING = (
    "fastmlp: Numba's cache has no writable directory here (not beside the package, not in "
    "the home directory), so every process compiles the kernels again, for about a minute; "
    "set NUMBA_CACHE_DIR to a writable directory to keep them")
# the functions that found no writable cache directory
UNCACHED = []
# every dispatcher package_jit made
DISPATCHERS = []


def overload_owners():
    """{id(library): (dispatcher, signature)} for every compiled overload of
    fastmlp's dispatchers."""
    return {id(result.library): (dispatcher, signature)
            for dispatcher in DISPATCHERS
            for signature, result in list(dispatcher.overloads.items())}


def load_calls(calls, target_context):
    """Loads (or compiles) the kernels that a cached function calls without
    a copy of their code, (module, qualname, signature, symbols) each, so
    that their code is in the JIT before the function's own. A symbol is
    the name the function calls its callee by; a name from the process that
    compiled it, which numbers its compiles: where this process named the
    callee otherwise, the symbol is made to stand for the callee's code.
    Raises CallsMissing if a callee cannot be loaded."""
    import importlib

    from llvmlite import binding
    engine = target_context.codegen()._engine
    for module, qualname, signature, symbols in calls:
        try:
            dispatcher = importlib.import_module(module)
            for name in qualname.split("."):
                dispatcher = getattr(dispatcher, name)
            dispatcher.compile(signature)
            result = dispatcher.overloads[signature]
        except Exception as error:
            raise CallsMissing(f"{module}.{qualname}{signature}") from error
        address = result.library.get_pointer_to_function(result.fndesc.mangled_name)
        if not address:
            raise CallsMissing(f"{module}.{qualname}{signature}")
        for symbol in symbols:
            if not engine.is_symbol_defined(symbol):
                binding.add_symbol(symbol, address)


def package_jit(**options):
    """numba.njit with `options`, cached on disk under the package's stamp
    when CACHE is set and Numba finds a writable cache directory; without
    one (a read-only install run by a user with no home directory, say) it
    warns once, and kernels compile in every process."""
    def decorate(function):
        dispatcher = numba.njit(**options)(function)
        DISPATCHERS.append(dispatcher)
        if CACHE:
            try:
                dispatcher._cache = PackageCache(function)  # what enable_caching does
            except RuntimeError:  # "no locator available"
                if not UNCACHED:
                    import warnings
                    warnings.warn(NO_CACHE_WARNING, RuntimeWarning, stacklevel=3)
                UNCACHED.append(function.__qualname__)
        return dispatcher
    return decorate


def caching():
    """Whether compiled kernels are kept on disk for the next process."""
    return CACHE and not UNCACHED


def numba_without_scipy_linalg():
    """Imports Numba's array maths with scipy.linalg hidden, in a process
    that is fastmlp's own (fastmlp-train, fastmlp-predict). numba.np.arraymath
    imports scipy.linalg (0.2-0.3 s, a sixth of a warm start) only to know
    whether np.dot of two vectors may call BLAS; fastmlp's kernels call no
    BLAS, a 2-D np.dot still finds SciPy when it compiles, and scipy.linalg
    imports as usual afterwards."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return  # nothing to save
    sys.modules["scipy.linalg"] = None  # its import raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg"]


# Kernels count no references to arrays (Numba's `_nrt` off). With counts,
# a kernel that is not inlined took a reference to every array of the
# Network and Work it was passed (a dozen each) and dropped them on return,
# each an atomic add on a counter that both threads' kernels share:
# tasks.total_work over 12 tasks took 3,350 cycles, 94 without. With
# buffers.row_weight, W1's step took 0.952 of the time and the regression
# benchmark's 0.933 (Zen 4, docs/performance.md). Without counts a kernel
# may not allocate, and Numba refuses to compile one that returns a view or
# calls a function that does: those are inline kernels (buffers.view2d),
# lowered in their callers' code.
NO_COUNTS = {"_nrt": False}

# A serial kernel: called from inside parallel loops, never parallel itself.
kernel = package_jit(fastmath=FASTMATH, nogil=True, error_model="numpy", **NO_COUNTS)
# One that allocates (forward_backward.region_plan): with counts.
allocating_kernel = package_jit(fastmath=FASTMATH, nogil=True, error_model="numpy")

# A serial kernel whose sums run in source order (no `reassoc`): for loops
# that vectorize without reordering, so that their results cannot depend on
# the function they are inlined into. LLVM compiles a kernel anew inside each
# caller, and with `reassoc` it may associate the same sum differently there.
ordered_kernel = package_jit(fastmath=ORDERED_FASTMATH, nogil=True, error_model="numpy",
                            **NO_COUNTS)

# A serial kernel that Numba inlines, as its IR, into the kernels that call
# it: no compiled code of its own, which LLVM would link and optimize again
# with every kernel it calls (seconds of a first compile for a few calls).
inline_kernel = package_jit(fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")


def link_as_compiled_pipeline():
    """A Numba compiler pipeline (pipeline_class) that lowers a function
    into a code library whose final module is not optimized again: the
    function's own code has had Numba's function passes, and every kernel
    it calls, linked in, the full optimization in its own library. Numba
    would run the full pipeline over all of that once more in each caller:
    2 s of train_steps' compile, which links both parallel regions, and
    1.2-1.5 s of each region's, which links its loop body (a first compile
    took 18.2-19.0 s against 20.2-21.0). The linked code is then the very
    code its kernel compiled alone, whichever caller runs it; calls from
    the function's own code stay calls. A fastmlp kernel it calls is not
    even linked in: Numba would copy the kernel's code into the library,
    and make machine code for it again (train_steps held a copy of both
    regions). The call stays a declaration, which the JIT resolves to the
    kernel's own code; cached, the function records the kernels it calls
    and loads them first (load_calls). A first compile of the lesson's
    network (`fastmlp-train --dataset fashion-mnist`, empty cache) took
    21.3-21.8 s against 22.6-22.9 with copies. None where this Numba lacks
    the internals it takes (Numba's own pipeline then compiles as usual)."""
    try:
        from numba.core import codegen, compiler, compiler_machinery, typed_passes

        class LinkedAsCompiledLibrary(codegen.JITCodeLibrary):
            # the kernels of fastmlp it calls: (module, qualname, signature,
            # the symbols of theirs it calls), found at finalize
            calls = ()

            def finalize(self):
                # The code of a fastmlp kernel it calls is not copied in:
                # its calls stay declarations, which the JIT resolves to the
                # kernel's own compiled code (and a cached function loads
                # its callees first: PackageCacheImpl.rebuild).
                owners = overload_owners()
                declared = {function.name for function in self._final_module.functions
                            if function.is_declaration}
                linked, calls = [], []
                for library in self._linking_libraries:
                    owner = owners.get(id(library))
                    if owner is None:  # linked in, with the kernels it calls
                        linked.append(library)
                        calls.extend(getattr(library, "calls", ()))
                        continue
                    dispatcher, signature = owner
                    symbol = dispatcher.overloads[signature].fndesc.mangled_name
                    calls.append((dispatcher.py_func.__module__, dispatcher.py_func.__qualname__,
                                  signature, (symbol,) if symbol in declared else ()))
                    self._reload_init.update(library._reload_init)
                self._linking_libraries = linked
                self.calls = tuple(calls)
                codegen.JITCodeLibrary.finalize(self)

            def _optimize_final_module(self):
                pass

        @compiler_machinery.register_pass(mutates_CFG=False, analysis_only=False)
        class LinkAsCompiled(compiler_machinery.LoweringPass):
            # gives the native lowering (next) the library to lower into
            _name = "fastmlp_link_as_compiled"

            def __init__(self):
                compiler_machinery.LoweringPass.__init__(self)

            def run_pass(self, state):
                if state.library is None:
                    state.library = LinkedAsCompiledLibrary(state.targetctx.codegen(),
                                                            state.func_id.func_qualname)
                    state.library.enable_object_caching()
                return False

        @compiler_machinery.register_pass(mutates_CFG=True, analysis_only=False)
        class LinkedParforLowering(typed_passes.NativeParforLowering):
            # Numba's parfor lowering, whose loop bodies (each compiled
            # into a library of its own, named for Numba's parfor gufuncs)
            # are linked as compiled too: a body calls a kernel's own code,
            # not a copy optimized again (fused_steps' body held one of
            # every step kernel: 8.6 s of its compile). (Numba compiles
            # under one global lock, so nothing else makes libraries
            # meanwhile.)
            _name = "fastmlp_linked_parfor_lowering"

            def run_pass(self, state):
                target_codegen = state.targetctx.codegen()
                create_library = target_codegen.create_library

                def create_body_library(name, **kwargs):
                    if name.startswith("__numba_parfor_gufunc"):
                        return LinkedAsCompiledLibrary(target_codegen, name, **kwargs)
                    return create_library(name, **kwargs)
                target_codegen.create_library = create_body_library
                try:
                    return typed_passes.NativeParforLowering.run_pass(self, state)
                finally:
                    del target_codegen.create_library

        class LinkAsCompiledCompiler(compiler.CompilerBase):
            def define_pipelines(self):
                pipeline = compiler.DefaultPassBuilder.define_nopython_pipeline(self.state)
                pipeline.add_pass_after(LinkAsCompiled, typed_passes.IRLegalization)
                if self.state.flags.auto_parallel.enabled:
                    pipeline.passes = [(LinkedParforLowering, description)
                                       if cls is typed_passes.NativeParforLowering
                                       else (cls, description)
                                       for cls, description in pipeline.passes]
                pipeline.finalize()
                return [pipeline]
    except (ImportError, AttributeError, TypeError):
        return None
    return LinkAsCompiledCompiler


LINK_AS_COMPILED = link_as_compiled_pipeline()

# A serial kernel that calls compiled kernels a few times each (the step
# loop, a step's part, a layer's or a task's work), linked as they were
# compiled (link_as_compiled_pipeline). Called only by drivers and parallel
# kernels: a plain kernel would link its code, whose calls to kernels stay
# declarations that a load from the cache leaves unresolved.
driver_kernel = package_jit(fastmath=FASTMATH, nogil=True, error_model="numpy",
                            pipeline_class=LINK_AS_COMPILED, **NO_COUNTS)
# One that allocates (step.train_steps, whose steps run in parallel kernels)
allocating_driver_kernel = package_jit(fastmath=FASTMATH, nogil=True, error_model="numpy",
                                       pipeline_class=LINK_AS_COMPILED)

# A kernel that owns one `prange` region (both cores). Its loop body calls
# kernels that do each part's work (forward_backward.region_part, say): the body and
# the region are linked as compiled, without copies of those kernels
# (link_as_compiled_pipeline).
parallel_kernel = package_jit(parallel=True, fastmath=FASTMATH, nogil=True, error_model="numpy",
                              pipeline_class=LINK_AS_COMPILED, **NO_COUNTS)


# (dispatcher, argument fingerprints) found ready: compiled code stays for
# the process, so the answer stays True (and typing the step's ~40 arrays
# anew took 0.6 ms, a quarter of a one-epoch fit on the iris data)
_READY = set()


def ready(dispatcher, args):
    """Whether calling dispatcher with args runs without compiling: machine
    code for their types is loaded already or waits in the disk cache for
    this CPU."""
    try:  # Numba's own key for its compiled code, in C
        key = (dispatcher, tuple(compute_fingerprint(arg) for arg in args))
    except Exception:
        key = None
    if key in _READY:
        return True
    try:
        signature = tuple(dispatcher.typeof_pyval(arg) for arg in args)
    except Exception:
        return False
    found = ready_for(dispatcher, signature)
    if found and key is not None:
        _READY.add(key)
    return found


def ready_for(dispatcher, signature):
    """Whether dispatcher has machine code for signature (a tuple of Numba
    types), loaded or in the disk cache for this CPU. (It reads Numba's
    private cache index; if that ever fails, the answer is False, so at
    worst the user is told of a compile that is quick.)"""
    signature = tuple(signature)
    try:
        if signature in dispatcher.overloads:
            return True
        magic = dispatcher.targetctx.codegen().magic_tuple()
        index = dispatcher._cache._cache_file._load_index()
        return any(key[0] == signature and key[1] == magic for key in index)
    except Exception:
        return False
