"""Numba's on-disk cache must not change results: training in a process that
compiles every kernel afresh gives the same parameters, bit for bit, as a
process that loads them all from the cache, and so does a first compile shared
with a child process (compile_ahead.py). (LLVM compiles a kernel anew in
each caller; a kernel whose result depends on that context fails here.)
And it must not outlive the code: a change to any of the package's files
makes every cached function compile again (jit.PackageCache)."""
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numba
import numpy as np

import fastmlp
from fastmlp import compile_ahead, jit

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastmlp
    from fastmlp import compile_ahead
    compile_ahead.PROCESSES = int(sys.argv[2])
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (600, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 600)
    out = {}
    for activation, optimizer in (("sigmoid", "sgd"), ("relu", "adam"), ("tanh", "momentum")):
        model = fastmlp.MLP([784, 30, 20, 10], activation=activation, seed=1)
        fastmlp.fit(model, X, y, epochs=2, batch_size=50, optimizer=optimizer, seed=2)
        out[activation] = model.params.tolist()
    # the step's kernels: compiled here, and found in the disk cache
    forward, gradients = fastmlp.forward_backward, fastmlp.gradients
    out["compiled"] = sum(forward.region.stats.cache_misses.values())
    out["loaded"] = sum(sum(kernel.stats.cache_hits.values())
                        for kernel in (gradients.gradients_region, forward.transpose_weights))
    # compiled before train_steps for the signature train_steps calls it with
    out["plans"] = len(forward.region_plan.signatures)
    json.dump(out, open(sys.argv[1], "w"))
""")


def run_script(script, result, cache_dir, *args):
    """What `script`, run in a fresh process with this Numba cache
    directory, writes to `result` as JSON (its first argument)."""
    env = {"NUMBA_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script, str(result), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(result.read_text())


def import_package():
    """Every module of the package, imported (so are its dispatchers)."""
    return [importlib.import_module(f"fastmlp.{module.name}")
            for module in pkgutil.iter_modules(fastmlp.__path__)]


def train(tmp_path, name, cache_dir, processes=2):
    out = run_script(SCRIPT, tmp_path / f"{name}.json", cache_dir, str(processes))
    counts = out.pop("compiled"), out.pop("loaded")
    assert out.pop("plans") == 1
    return counts, {k: np.array(v, np.float32) for k, v in out.items()}


def test_a_fresh_compile_and_the_cache_train_to_the_same_parameters(tmp_path):
    cache = tmp_path / "numba-cache"
    # empty caches: compiled in this process alone, and with a child's help
    # (where there is a second core)
    counts, alone = train(tmp_path, "alone", tmp_path / "numba-cache-alone", processes=1)
    assert counts == (1, 0), counts
    counts, fresh = train(tmp_path, "fresh", cache)
    assert any(cache.rglob("*.nbc")), "nothing was cached"
    if compile_ahead.available_cores() >= 2:
        # forward_backward's region compiled once, here; the child's kernel
        # (gradients_update's region) loaded
        assert counts == (1, 1), counts
    _, cached = train(tmp_path, "cached", cache)
    for name in fresh:
        assert np.array_equal(alone[name], fresh[name]), name
        assert np.array_equal(fresh[name], cached[name]), name


def test_every_cached_function_is_stamped_with_the_whole_package():
    # a function's machine code holds the kernels and constants it uses from
    # other files, so its cache must go stale when any of them changes
    cached = {}
    for module in import_package():
        for name, value in vars(module).items():
            if isinstance(value, numba.core.dispatcher.Dispatcher) and \
                    value.py_func.__module__.startswith("fastmlp."):
                cached[f"{value.py_func.__module__}.{name}"] = value
    assert len(cached) > 50 and "fastmlp.step.train_steps" in cached
    for name, dispatcher in cached.items():
        assert isinstance(dispatcher._cache, jit.PackageCache), name
        assert dispatcher._cache._cache_file._source_stamp == jit.package_digest(), name


def test_the_package_digest_changes_with_any_source_file(tmp_path):
    digest = jit.package_digest.__wrapped__  # uncached: the files change below
    shutil.copytree(jit.PACKAGE_DIR, tmp_path / "copy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    copy = str(tmp_path / "copy")
    assert digest(copy) == jit.package_digest()
    seen = {digest(copy)}
    for name in ("cli.py", "kernels.py", "microkernel.py"):
        with open(tmp_path / "copy" / name, "a") as source:
            source.write("# edited\n")
        seen.add(digest(copy))
    (tmp_path / "copy" / "new_module.py").write_text("")
    seen.add(digest(copy))
    assert len(seen) == 5


def test_a_frozen_application_keeps_numbas_stamp_of_its_executable(monkeypatch):
    def twice(x):
        return 2 * x

    stamps = {}
    for frozen in (False, True):
        monkeypatch.setattr(sys, "frozen", frozen, raising=False)
        stamps[frozen] = [locator(twice, __file__).get_source_stamp()
                          for locator in jit.PackageCacheImpl._locator_classes[:3]]
    assert stamps[False] == [jit.package_digest()] * 3
    executable = numba.core.caching._hash_source_file(
        sys.executable, os.stat(sys.executable).st_mtime, os.stat(sys.executable).st_size)
    assert stamps[True] == [executable] * 3


CACHE_HITS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from fastmlp import kernels
    assert kernels.__file__.startswith(sys.argv[1])
    kernels.finite(1.0)
    print(sum(kernels.finite.stats.cache_hits.values()))
""")


def test_a_change_to_another_file_recompiles_a_cached_kernel(tmp_path):
    package = tmp_path / "package" / "fastmlp"
    shutil.copytree(jit.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))

    def cache_hits():
        proc = subprocess.run([sys.executable, "-c", CACHE_HITS, str(package.parent)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    assert cache_hits() == 0  # compiled, and cached
    assert cache_hits() == 1  # loaded from the cache
    with open(package / "cli.py", "a") as source:  # finite() does not use cli.py
        source.write("# edited\n")
    assert cache_hits() == 0  # stale: compiled again
    assert cache_hits() == 1


def test_a_package_imported_from_a_zip_archive_is_cached(tmp_path):
    # no source files there to hash: the archive's own stamp serves
    archive = tmp_path / "fastmlp.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in sorted(os.listdir(jit.PACKAGE_DIR)):
            if name.endswith(".py"):
                zipped.write(os.path.join(jit.PACKAGE_DIR, name), f"fastmlp/{name}")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    hits = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CACHE_HITS, str(archive)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        hits.append(int(proc.stdout))
    assert hits == [0, 1]


NO_CACHE = textwrap.dedent("""
    import sys, warnings
    sys.path.insert(0, sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastmlp
    from fastmlp import jit, kernels
    assert kernels.__file__.startswith(sys.argv[1])
    assert kernels.finite(1.0) and not kernels.finite(float("nan"))
    print(sum(jit.NO_CACHE_WARNING in str(w.message) for w in caught), jit.caching())
""")


def test_without_a_writable_cache_directory_it_warns_once_and_compiles(tmp_path):
    # no place for Numba's cache: a file where __pycache__ would go beside
    # the package, and a home directory that is a file (as for a service
    # account's read-only install); Numba's own caching raises at import
    package = tmp_path / "package" / "fastmlp"
    shutil.copytree(jit.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__pycache__").write_text("")
    home = tmp_path / "home"
    home.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"))
    proc = subprocess.run([sys.executable, "-c", NO_CACHE, str(package.parent)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "False"]
    assert jit.caching()  # here, where the cache has a place


def test_drivers_and_parallel_regions_link_their_kernels_as_compiled():
    # train_steps and the parallel regions take this Numba's pipeline that
    # does not optimize linked kernels again (jit.link_as_compiled_pipeline):
    # a caller then holds each kernel's code as the kernel compiled it
    assert jit.LINK_AS_COMPILED is not None
    from fastmlp import forward_backward, gradients, step
    for dispatcher in (step.train_steps, forward_backward.region, gradients.gradients_region,
                       forward_backward.transpose_weights):
        assert dispatcher._compiler.pipeline_class is jit.LINK_AS_COMPILED, dispatcher

    @numba.njit
    def twice(x):
        return 2.0 * x

    @numba.njit(pipeline_class=jit.LINK_AS_COMPILED)
    def driver(x):
        return twice(x) + twice(x + 1.0)

    @numba.njit
    def usual_driver(x):
        return twice(x) + twice(x + 1.0)

    assert driver(3.0) == usual_driver(3.0) == 14.0
    callee = twice.overloads[twice.signatures[0]].library
    name = next(f.name for f in callee.get_defined_functions()
                if f.name.startswith("_ZN") and "twice" in f.name)

    def defines(library):
        return any(f.name == name and not f.is_declaration
                   for f in library._final_module.functions)

    linked = driver.overloads[driver.signatures[0]].library
    assert type(linked).__name__ == "LinkedAsCompiledLibrary"
    # linked and called as compiled; Numba's own pipeline optimizes it
    # again, inlined into the driver (and its copy dropped)
    assert defines(linked)
    assert not defines(usual_driver.overloads[usual_driver.signatures[0]].library)


CALLER_MODULE = textwrap.dedent("""
    from fastmlp.jit import driver_kernel, kernel

    @kernel
    def other(x):
        return x + 1.0

    @kernel
    def leaf(x):
        total = 0.0
        for value in x:
            total += value * value
        return total

    @driver_kernel
    def caller(x):
        return leaf(x) + 1.0
""")

CALLER_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import callers
    if sys.argv[1] == "renumber":  # compile others first: leaf gets another name
        callers.other(1.0), callers.other(np.int64(3))
        callers.leaf(np.arange(4.0))
    result = callers.caller(np.arange(4.0)) if sys.argv[1] != "renumber" else None
    leaf = callers.leaf.overloads[callers.leaf.signatures[0]]
    print(json.dumps({"result": result, "leaf": leaf.fndesc.mangled_name,
                      "loaded": sum(callers.caller.stats.cache_hits.values())}))
""")


def test_a_driver_calls_a_kernels_own_code_and_loads_it_from_the_cache(tmp_path):
    # A driver's library holds no copy of a fastmlp kernel it calls: the
    # call stays a declaration, resolved to the kernel's own code. From the
    # cache, the driver loads its kernels first; it calls a kernel by the
    # name of the process that compiled it (Numba numbers a process's
    # compiles), which need not be this process's name for it.
    (tmp_path / "callers.py").write_text(CALLER_MODULE)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
               PYTHONPATH=str(tmp_path))

    def run(mode):
        proc = subprocess.run([sys.executable, "-c", CALLER_RUN, mode], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    first = run("compile")
    assert first == {"result": 15.0, "leaf": first["leaf"], "loaded": 0}
    # (every cache directory: fastmlp's own kernels may have one beside callers')
    for path in (tmp_path / "numba-cache").rglob("callers.leaf-*"):  # leaf compiled again
        path.unlink()
    renumbered = run("renumber")
    assert renumbered["leaf"] != first["leaf"]
    # the driver from the cache, the kernel too, under its new name
    assert run("load") == {"result": 15.0, "leaf": renumbered["leaf"], "loaded": 1}

    # and in this process: the driver's code declares the kernel, defines it not
    sys.path.insert(0, str(tmp_path))
    try:
        callers = importlib.import_module("callers")
        callers.caller(np.arange(4.0))
    finally:
        sys.path.remove(str(tmp_path))
    library = callers.caller.overloads[callers.caller.signatures[0]].library
    name = callers.leaf.overloads[callers.leaf.signatures[0]].fndesc.mangled_name
    assert [f.is_declaration for f in library._final_module.functions if f.name == name] == [True]
    assert library.calls == (("callers", "leaf", callers.leaf.signatures[0], (name,)),)


LINK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numba
    import numpy as np
    from fastmlp import kernels
    kernels.finite(1.0)  # compiled, or loaded from the cache
    library = kernels.finite.overloads[kernels.finite.signatures[0]].library
    unparsed = getattr(library, "bitcode", None) is not None

    @numba.njit
    def caller(x):  # links finite's code into its own
        return kernels.finite(x) and not kernels.finite(x * np.inf)

    json.dump({"loaded": sum(kernels.finite.stats.cache_hits.values()),
               "lazy": type(library).__name__ == "LazyLinkingLibrary",
               "unparsed": unparsed, "linked": bool(caller(1.0)),
               "parsed": getattr(library, "bitcode", None) is None}, open(sys.argv[1], "w"))
""")


def test_a_kernel_from_the_cache_parses_its_bitcode_only_when_a_compile_links_it(tmp_path):
    """jit.loaded_lazily: a process that loads a kernel's machine code from
    the cache leaves the LLVM bitcode beside it unparsed, until a new
    compile links the kernel in; the linked code then runs."""
    compiled, loaded = (run_script(LINK_SCRIPT, tmp_path / f"{name}.json", tmp_path / "cache")
                        for name in ("compiled", "loaded"))
    assert compiled == {"loaded": 0, "lazy": False, "unparsed": False, "linked": True,
                        "parsed": True}
    assert loaded == {"loaded": 1, "lazy": True, "unparsed": True, "linked": True,
                      "parsed": True}


def test_no_plain_kernel_calls_one_linked_as_compiled():
    """A driver or parallel kernel (jit.link_as_compiled_pipeline) leaves
    its calls to other kernels as declarations, and records the callees it
    must load first from the cache. A plain kernel that called one would
    link in that code without the record: loaded from the cache, its calls
    would find nothing. So only drivers and parallel kernels call them,
    directly or through kernels Numba inlines (inline_kernel)."""
    import_package()

    def linked_as_compiled(dispatcher):
        return dispatcher._compiler.pipeline_class is jit.LINK_AS_COMPILED

    def inlined(dispatcher):
        return dispatcher.targetoptions.get("inline") == "always"

    def callees(dispatcher):
        # the kernels its code names, and through inlined ones theirs
        names = dispatcher.py_func.__code__.co_names
        scope = dispatcher.py_func.__globals__
        for value in (scope.get(name) for name in names):
            if value in jit.DISPATCHERS:
                yield value
                if inlined(value):
                    yield from callees(value)

    assert jit.LINK_AS_COMPILED is not None
    wrong = [(caller.py_func.__qualname__, callee.py_func.__qualname__)
             for caller in jit.DISPATCHERS
             if not linked_as_compiled(caller) and not inlined(caller)
             for callee in callees(caller) if linked_as_compiled(callee)]
    assert not wrong, wrong
    # the check sees such a call: the step's parts call drivers
    from fastmlp import forward_backward
    assert any(linked_as_compiled(callee) for callee in callees(forward_backward.region_part))
