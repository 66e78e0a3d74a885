"""Numba's on-disk cache must not change results: training in a process that
compiles every kernel afresh gives the same parameters, bit for bit, as a
process that loads them all from the cache. (LLVM compiles a kernel anew in
each caller; a kernel whose result depends on that context fails here.)"""
import json
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastmlp
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (600, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 600)
    out = {}
    for activation, optimizer in (("sigmoid", "sgd"), ("relu", "adam"), ("tanh", "momentum")):
        model = fastmlp.MLP([784, 30, 20, 10], activation=activation, seed=1)
        fastmlp.fit(model, X, y, epochs=2, batch_size=50, optimizer=optimizer, seed=2)
        out[activation] = model.params.tolist()
    json.dump(out, open(sys.argv[1], "w"))
""")


def train(tmp_path, name, cache_dir):
    result = tmp_path / f"{name}.json"
    env = {"NUMBA_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(result)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {k: np.array(v, np.float32) for k, v in json.loads(result.read_text()).items()}


def test_a_fresh_compile_and_the_cache_train_to_the_same_parameters(tmp_path):
    cache = tmp_path / "numba-cache"
    fresh = train(tmp_path, "fresh", cache)  # empty cache: compiles and fills it
    assert any(cache.rglob("*.nbc")), "nothing was cached"
    cached = train(tmp_path, "cached", cache)
    for name in fresh:
        assert np.array_equal(fresh[name], cached[name]), name
