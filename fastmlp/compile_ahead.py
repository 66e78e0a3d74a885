"""A model dtype's first compile, shared with a second process (or MPI rank).

Compiling the training step (`step.train_steps`) takes about a minute,
nearly all of it LLVM on one core, and most of that in the step's two
parallel kernels, which do not call each other. So when the step is not in
the disk cache and a second core is free, a child process compiles
`gradients_update`'s parallel region into the cache while this process
compiles `forward_backward`'s, `transpose_weights` and `region_plan` (which
only `train_steps` calls: compiled here, it leaves `train_steps` less to do
after both halves); compiling `train_steps` then loads the child's kernels
from the cache and links them as it would have linked its own (the cache
keeps their LLVM bitcode), so the machine code is the same.
On a 2-core Zen 3, `fastmlp-train --compile-only` from an empty cache took
41-45 s this way and 66-74 s in one process (2026-12-01); with
`region_plan` in this process's half and the step's parts linked as
compiled (jit.driver_kernel), 26-32 s (2026-12-04, docs/performance.md).

MPI ranks on one machine compile side by side anyway (each rank on its own
cores), so there two ranks compile one half each instead.

The child runs this package with this process's Numba configuration (cache
directory, CPU name and features), so what it writes is what this process
looks up. Whatever goes wrong in it costs time only: this process then
compiles what it does not find, as it would have anyway.
"""
import os
import pickle
import subprocess
import sys

import numba
from numba import typeof, types

from . import jit
from .forward_backward import region, region_plan, transpose_weights
from .gradients import gradients_region

# processes a first compile may use: 1 compiles in this process alone
PROCESSES = 2
# a child still compiling after this long is stopped (its share is then
# compiled here)
CHILD_SECONDS = 900
# the child: this package (the same files, whatever its name), then the
# jobs pickled on its standard input
CHILD_CODE = """
import importlib, os, sys
package_dir, name = sys.argv[1:3]
if os.path.dirname(package_dir) not in sys.path:
    sys.path.insert(0, os.path.dirname(package_dir))
module = importlib.import_module(name + ".compile_ahead")
if os.path.dirname(os.path.abspath(module.__file__)) != package_dir:
    sys.exit(3)  # another copy of the package comes first
module.compile_from(sys.stdin.buffer)
"""


def step_jobs(work, net, opt, data):
    """The kernels train_steps calls with these buffers, as (dispatcher,
    signature) pairs with the types it passes, in two halves of about the
    same compile time: forward_backward's parallel region,
    transpose_weights and region_plan; gradients_update's
    (gradients_region)."""
    i64 = types.int64
    boolean = types.boolean
    return ([(region, (typeof(work), typeof(net), typeof(data), i64, i64,
                       typeof(net.params).dtype, boolean, i64, i64, types.Array(i64, 1, "C"))),
             (transpose_weights, (typeof(work.weights_t), typeof(net))),
             (region_plan, (typeof(work), typeof(net), i64, boolean))],
            [(gradients_region, (typeof(work), typeof(net), typeof(opt), i64, boolean, boolean,
                                 i64, boolean, i64))])


def step_kernels(work, net, opt, data):
    """Compiles, or loads from the cache, the kernels train_steps calls with
    these buffers, about half of them in a child process when that can pay
    (can_share). Call it before train_steps' first call for these buffer
    types."""
    here, there = step_jobs(work, net, opt, data)
    child = start_child(there) if can_share(there) else None
    try:
        for dispatcher, signature in here:
            dispatcher.compile(signature)
    except BaseException:
        if child is not None:
            stop(child)
        raise
    if child is not None:
        finish(child)


def step_kernels_on_ranks(comm, cached, work, net, opt, data):
    """step_kernels for MPI ranks (a collective call: every rank of comm
    makes it, `cached` saying whether train_steps is ready on this one).
    Ranks on one machine share a disk cache and already run side by side,
    so there the first two compile one half each and the others wait; then
    every rank's train_steps loads both halves. A rank alone on its machine
    shares with a child process instead."""
    if comm.size > 1:
        from mpi4py import MPI
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            if local.size > 1:
                if local.allreduce(0 if cached else 1) > 0:  # some rank here compiles
                    if local.rank < 2:
                        for dispatcher, signature in step_jobs(work, net, opt, data)[local.rank]:
                            dispatcher.compile(signature)
                    local.Barrier()
                return
        finally:
            local.Free()
    if not cached:
        step_kernels(work, net, opt, data)


def can_share(jobs):
    """Whether a child process may compile `jobs` ((dispatcher, signature)
    pairs) for this one: a second core, a disk cache to meet in, a Python
    executable to start, and something left to compile."""
    if PROCESSES < 2 or available_cores() < 2 or getattr(sys, "frozen", False):
        return False
    if "python" not in os.path.basename(sys.executable or "").lower():
        return False  # an embedding application's executable
    if not all(isinstance(dispatcher._cache, jit.PackageCache) for dispatcher, _ in jobs):
        return False  # caching off
    return not all(jit.ready_for(dispatcher, signature) for dispatcher, signature in jobs)


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start_child(jobs):
    """A child process compiling `jobs` into the disk cache, or None if it
    cannot start. Its own session: a Ctrl-C at the terminal (which fit
    defers until the compile is done) does not stop it halfway."""
    env = dict(os.environ)
    for name, value in (("NUMBA_CACHE_DIR", numba.config.CACHE_DIR),
                        ("NUMBA_CPU_NAME", numba.config.CPU_NAME),
                        ("NUMBA_CPU_FEATURES", numba.config.CPU_FEATURES)):
        if value is not None and value != "":
            env[name] = value
    payload = pickle.dumps([(d.py_func.__module__, d.py_func.__name__, tuple(signature))
                            for d, signature in jobs])
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD_CODE, jit.PACKAGE_DIR, __package__],
                                 stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
    except OSError:
        return None
    try:
        child.stdin.write(payload)
        child.stdin.close()
    except OSError:  # it died at once
        stop(child)
        return None
    return child


def finish(child):
    """Waits for the child; stops it if it takes too long (its share is
    then compiled here), or if this process is leaving (an exception)."""
    try:
        child.wait(timeout=CHILD_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(child)


def stop(child):
    """Kills the child if it still runs, and reaps it."""
    if child.poll() is None:
        child.kill()
    child.wait()


def compile_from(stream):
    """The child's work: compiles each (module, function, signature) that
    `stream` holds, pickled, into the disk cache."""
    import importlib
    for module, name, signature in pickle.load(stream):
        getattr(importlib.import_module(module), name).compile(signature)
