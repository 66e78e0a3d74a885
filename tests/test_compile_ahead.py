"""A first compile shared with a child process (compile_ahead.py): the child
compiles into the disk cache this process reads, and stops when it must.
(That a fit compiled this way trains to the same parameters as one compiled
in one process: tests/test_cache.py.)"""
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numba
import numpy as np
import pytest
from numba import types

from fastmlp import compile_ahead, jit, kernels

CHILD_FILLS_THE_CACHE = textwrap.dedent("""
    from numba import types
    from fastmlp import compile_ahead, jit, kernels
    job = (kernels.finite, (types.float64,))
    assert not jit.ready_for(*job)
    assert compile_ahead.can_share([job])
    child = compile_ahead.start_child([job])
    compile_ahead.finish(child)
    assert child.returncode == 0, child.returncode
    assert jit.ready_for(*job)
    kernels.finite(1.0)
    print(sum(kernels.finite.stats.cache_hits.values()),
          sum(kernels.finite.stats.cache_misses.values()))
""")


@pytest.mark.skipif(compile_ahead.available_cores() < 2, reason="one core: no child is started")
def test_the_child_compiles_into_the_cache_this_process_reads(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    proc = subprocess.run([sys.executable, "-c", CHILD_FILLS_THE_CACHE], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "0"]  # loaded, not compiled


def test_no_child_where_it_cannot_pay(monkeypatch):
    kernels.finite(1.0)  # compiled in this process now
    assert not compile_ahead.can_share([(kernels.finite, (types.float64,))])
    job = (kernels.finite, (types.Array(types.float32, 3, "C"),))  # never compiled
    monkeypatch.setattr(compile_ahead, "available_cores", lambda: 2)
    assert compile_ahead.can_share([job])
    monkeypatch.setattr(compile_ahead, "PROCESSES", 1)
    assert not compile_ahead.can_share([job])
    monkeypatch.setattr(compile_ahead, "PROCESSES", 2)
    monkeypatch.setattr(compile_ahead, "available_cores", lambda: 1)
    assert not compile_ahead.can_share([job])
    monkeypatch.setattr(compile_ahead, "available_cores", lambda: 2)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert not compile_ahead.can_share([job])
    monkeypatch.setattr(sys, "frozen", False)
    monkeypatch.setattr(sys, "executable", "/usr/bin/blender")
    assert not compile_ahead.can_share([job])


def test_a_child_that_takes_too_long_is_stopped(monkeypatch):
    monkeypatch.setattr(compile_ahead, "CHILD_SECONDS", 0.2)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    compile_ahead.finish(child)
    assert child.returncode is not None and child.returncode < 0  # killed


def test_a_failed_compile_here_stops_the_child(monkeypatch):
    children = []

    def start_sleeper(jobs):
        children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return children[-1]

    class Broken:
        def compile(self, signature):
            raise numba.core.errors.TypingError("broken")

    monkeypatch.setattr(compile_ahead, "can_share", lambda jobs: True)
    monkeypatch.setattr(compile_ahead, "start_child", start_sleeper)
    monkeypatch.setattr(compile_ahead, "region", Broken())
    from fastmlp import MLP, training
    import numpy as np
    model = MLP([3, 2, 2])
    state = training.optimizer_state(model, "sgd", (0.1, 0.9, False, 0.0), None)
    model.training_state = training.TrainingState(0)
    loop = training.EpochLoop(model, state, np.zeros((4, 3), np.float32),
                              np.array([0, 1, 0, 1], np.int32), np.ones(4, np.float32), 2, True,
                              "epoch", None)
    with pytest.raises(numba.core.errors.TypingError):
        compile_ahead.step_kernels(*loop.step_arguments(0, 0)[:4])
    assert children[0].poll() is not None  # not left running


def test_the_child_compiles_nothing_for_another_copy_of_the_package(tmp_path):
    # told of a package directory that is not the one it imports, it stops
    # (its cache entries would carry another package's stamp)
    proc = subprocess.run([sys.executable, "-c", compile_ahead.CHILD_CODE,
                           str(tmp_path / "fastmlp"), "fastmlp"],
                          input=pickle.dumps([(kernels.finite.py_func.__module__, "finite",
                                               (types.float64,))]),
                          capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    proc = subprocess.run([sys.executable, "-c", compile_ahead.CHILD_CODE,
                           os.path.dirname(compile_ahead.__file__), "fastmlp"],
                          input=pickle.dumps([]), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ready_remembers_compiled_code_and_nothing_else():
    @numba.njit
    def double(x):
        return x * 2

    float64s, float32s = np.ones(3), np.ones(3, np.float32)
    assert not jit.ready(double, (float64s,))
    double(float64s)
    assert jit.ready(double, (float64s,)) and jit.ready(double, (np.zeros(5),))  # remembered
    assert not jit.ready(double, (float32s,))  # another type: not compiled
    assert not jit.ready(double, (float64s[::2],))  # another layout
    double(float32s)
    assert jit.ready(double, (float32s,))


def test_a_quiet_fit_says_on_stderr_when_it_compiles(capsys, monkeypatch):
    """verbose=0 (and the estimators' verbose=False) still announce a first
    compile, which takes about a minute, on stderr; a cached one is silent."""
    import fastmlp
    from fastmlp.progress import COMPILE_NOTICE

    X = np.random.default_rng(0).normal(size=(40, 3))
    y = np.arange(40) % 2
    for _ in range(2):  # the first may compile (and say so)
        capsys.readouterr()
        fastmlp.fit(fastmlp.MLP([3, 4, 2], dtype="float64", seed=0), X, y, epochs=1)
    assert capsys.readouterr() == ("", "")  # compiled by now: nothing said
    monkeypatch.setattr(jit, "ready", lambda *args: False)  # as if it must compile
    monkeypatch.setattr(compile_ahead, "step_kernels", lambda *args: None)
    fastmlp.fit(fastmlp.MLP([3, 4, 2], dtype="float64", seed=0), X, y, epochs=1)
    assert capsys.readouterr() == ("", COMPILE_NOTICE + "...\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=1 does not converge
        fastmlp.MLPClassifier(hidden_layer_sizes=(4,), max_iter=1).fit(X, y)
    assert capsys.readouterr().err == COMPILE_NOTICE + "...\n"
    fastmlp.fit(fastmlp.MLP([3, 4, 2], dtype="float64", seed=0), X, y, epochs=1, verbose=1)
    out, err = capsys.readouterr()
    assert out.startswith(COMPILE_NOTICE) and err == ""  # the progress printer says it
