"""fastmlp against its peers on the performance workloads, back to back.

    python scripts/compare.py [--workloads W1,W2,W3] [--epochs 2] [--peers fastmlp,numpy,torch,sklearn]
    python scripts/compare.py --peers fastmlp,fastmlp_1thread   # 2 threads against 1
    python scripts/compare.py --workloads "" --sklearn   # only the MLPClassifier comparison
    python scripts/compare.py --workloads "" --regression  # MLPRegressor against scikit-learn's
    python scripts/compare.py --workloads "" --lbfgs   # MLPClassifier(solver="lbfgs") likewise

Each peer of a workload runs in a process of its own, so that its peak RSS
is its own, from the same initial weights as the others. It warms up first
(one untimed step or epoch on a few batches, which compiles), the peers one
after the other, and then they take turns: a turn is --epochs timed epochs
of SGD of one peer while the others wait, idle. A round is a turn of every
peer, in the order of --peers, and the next round in the reverse order, so
that no peer always runs right after fastmlp; --rounds rounds in all, each
peer's process training on from one round to the next. Then each reports
its epochs per second (the median of each turn's epochs), its test accuracy
after all its epochs (so no one wins by computing something else), its
peak RSS and the BLAS kernel threadpoolctl saw. Peers that are not
installed are skipped with a note. `keras` is Keras 3 trained by
model.fit, on the JAX backend unless KERAS_BACKEND names another (`pip
install keras jax`; on PyTorch's backend it ran W1 5x slower than on JAX's).

On a shared machine whose speed moves by 2x from one minute to the next,
fastmlp's speed-up over a peer is the median of the rounds' ratios
(fastmlp's rate over the peer's in the same round, seconds apart), printed
with each round's ratio; epochs/s is the median over the rounds.

Each round also measures the float32 matrix product rate (NumPy's sgemm,
1024^3) with OpenBLAS's native kernel for this CPU: in a process of its
own without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which some machines set
(the peers keep the environment as it is). A peer's "% peak" is the median
over the rounds of its rate as a share of that round's peak. And it
measures the round trip of a cache line between the first two CPUs
(two_cores.round_trip_ns): a virtual machine's host may move its CPUs
apart for minutes, which slows whatever two threads share (W1's two
threads ran 1.72x one thread's speed at 50-100 ns, 1.35x at 330-390).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from workloads import WORKLOADS, flops_per_epoch, sgemm_gflops  # noqa: E402

PEERS = ["fastmlp", "fastmlp_1thread", "fastmlp_bf16", "numpy", "torch", "torch_bf16", "sklearn",
         "jax", "keras"]
MODULE_OF = {"fastmlp": "fastmlp", "fastmlp_1thread": "fastmlp", "fastmlp_bf16": "fastmlp",
             "numpy": "numpy",
             "torch": "torch", "torch_bf16": "torch", "sklearn": "sklearn", "jax": "jax",
             "keras": "keras"}


def load_data():
    from fastmlp.datasets import DEBIAN_FASHION_MNIST, load_directory
    return load_directory(DEBIAN_FASHION_MNIST)


def initial_weights(sizes, seed=0):
    """Glorot-uniform weights (fan_in, fan_out) and zero biases, float32."""
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32))
    return weights, [np.zeros(s, np.float32) for s in sizes[1:]]


# In a peer's process (--serve), the epochs of one turn: set by serve()
TURN_EPOCHS = 0
# what a peer's process prints for the coordinator, each on a line of its own
READY, RESULT = "@@compare-ready", "@@compare-result "
# the thread count fastmlp's fit trained on (its probe's choice unless told)
FIT_THREADS = None


def wait_turn(epoch):
    """Called by every runner before its timed epoch `epoch` (from 0). In a
    peer's process, at the start of each turn of TURN_EPOCHS epochs: says
    that the peer is ready (warmed up, or done with its last turn) and waits
    for the coordinator's go. Elsewhere it does nothing."""
    if TURN_EPOCHS and epoch % TURN_EPOCHS == 0:
        print(READY, flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit(1)


def run_fastmlp(workload, data, epochs, dtype="float32", threads=None):
    import fastmlp
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    x_train, y_train, x_test, y_test = data
    model = fastmlp.MLP(sizes, activation=activation, dtype=dtype)
    weights, biases = initial_weights(sizes)
    for w, w0 in zip(model.weights, weights):
        w[...] = w0
    fastmlp.fit(model, x_train[:batch_size], y_train[:batch_size], lr=lr, seed=0)  # compile
    model.optimizer_state = None
    for w, w0 in zip(model.weights, weights):
        w[...] = w0
    from fastmlp.progress import Callback

    class Turns(Callback):
        # (epoch_time counts the training loop's calls only, not this wait)
        epoch = 0

        def on_compile_begin(self, cached):
            # the first turn starts before fit's probe of the thread count
            # (threads=None), so that the probe runs alone, as a user's
            # would, not while the other peers warm up (the table's BLAS
            # column says what it chose)
            wait_turn(0)

        def on_epoch_begin(self, epoch, total_epochs, n_steps):
            if self.epoch:  # (epoch 0's turn began before the probe)
                wait_turn(self.epoch)
            self.epoch += 1
    history = fastmlp.fit(model, x_train, y_train, epochs=epochs, batch_size=batch_size,
                          lr=lr, seed=0, threads=threads, callbacks=[Turns()])
    global FIT_THREADS
    FIT_THREADS = history.threads
    return history.history["epoch_time"], model.evaluate(x_test, y_test)[1]


def run_fastmlp_1thread(workload, data, epochs):
    # fastmlp on one thread: its row's ratio is the speed-up of all threads
    return run_fastmlp(workload, data, epochs, threads=1)


def run_fastmlp_bf16(workload, data, epochs):
    # dtype="bfloat16": bfloat16 products, on AMX tiles or vdpbf16ps where
    # the CPU has them (amx.usable), else emulated in float32
    return run_fastmlp(workload, data, epochs, dtype="bfloat16")


def run_numpy(workload, data, epochs):
    from fastmlp import reference
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    x_train, y_train, x_test, y_test = data
    weights, biases = initial_weights(sizes)
    rng = np.random.default_rng(0)
    times = []
    for epoch in range(epochs):
        wait_turn(epoch)
        order = rng.permutation(len(x_train))
        start = time.perf_counter()
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        reference.train(weights, biases, x_train, y_train, activation, batches, lr=np.float32(lr))
        times.append(time.perf_counter() - start)
    probs = reference.forward(weights, biases, x_test, activation)[-1]
    return times, float(np.mean(probs.argmax(axis=1) == y_test))


def run_torch(workload, data, epochs, bf16=False):
    """PyTorch eager, float32; with bf16, under torch.autocast("cpu",
    torch.bfloat16), as a PyTorch user on a recent CPU would train."""
    import contextlib
    import torch
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    weights, biases = initial_weights(sizes)
    layers = []
    for l, (w, b) in enumerate(zip(weights, biases)):
        linear = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.zero_()
        layers.append(linear)
        if l < len(weights) - 1:
            layers.append({"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU,
                           "tanh": torch.nn.Tanh}[activation]())
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    X = torch.from_numpy(x_train.astype(np.float32) / 255)
    y = torch.from_numpy(y_train.astype(np.int64))

    def autocast():
        return (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    times = []
    for epoch in range(epochs):
        wait_turn(epoch)
        order = torch.randperm(len(X))
        start = time.perf_counter()
        for s in range(0, len(X), batch_size):
            rows = order[s:s + batch_size]
            optimizer.zero_grad()
            with autocast():
                loss = loss_fn(model(X[rows]), y[rows])
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    with torch.no_grad(), autocast():
        pred = model(torch.from_numpy(x_test.astype(np.float32) / 255)).argmax(dim=1).numpy()
    return times, float(np.mean(pred == y_test))


def run_torch_bf16(workload, data, epochs):
    return run_torch(workload, data, epochs, bf16=True)


def run_jax(workload, data, epochs):
    """The peer table's JAX set-up: a whole epoch in one jit, the steps of its
    full batches in lax.scan (the last, partial batch is one more jitted step)."""
    import jax
    import jax.numpy as jnp
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    x_train, y_train, x_test, y_test = data
    act = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}[activation]
    weights, biases = initial_weights(sizes)
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(weights, biases)]

    def logits(params, x):
        for w, b in params[:-1]:
            x = act(x @ w + b)
        w, b = params[-1]
        return x @ w + b

    def loss(params, x, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(params, x)),
                                             y[:, None], axis=1))

    def step(params, batch):
        grads = jax.grad(loss)(params, *batch)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), None

    n = len(x_train)
    full = n // batch_size * batch_size

    @jax.jit
    def train_epoch(params, X, y, order):
        xs = X[order[:full]].reshape(-1, batch_size, X.shape[1])
        ys = y[order[:full]].reshape(-1, batch_size)
        params, _ = jax.lax.scan(step, params, (xs, ys))
        if full < n:
            params, _ = step(params, (X[order[full:]], y[order[full:]]))
        return params

    X = jnp.asarray(x_train.astype(np.float32) / 255)
    y = jnp.asarray(y_train.astype(np.int32))
    rng = np.random.default_rng(0)
    jax.block_until_ready(train_epoch(params, X, y, jnp.asarray(rng.permutation(n))))  # compile
    times = []
    for epoch in range(epochs):
        wait_turn(epoch)
        order = jnp.asarray(rng.permutation(n))
        start = time.perf_counter()
        params = jax.block_until_ready(train_epoch(params, X, y, order))
        times.append(time.perf_counter() - start)
    pred = np.asarray(logits(params, jnp.asarray(x_test.astype(np.float32) / 255)).argmax(1))
    return times, float(np.mean(pred == y_test))


def keras_backend():
    """The backend the keras peer runs on: KERAS_BACKEND if set, else JAX
    (Keras 3's default, TensorFlow, is rarely installed beside it)."""
    return os.environ.get("KERAS_BACKEND") or "jax"


def run_keras(workload, data, epochs):
    """Keras 3 as the lesson uses it: a Sequential model of Dense layers,
    compiled with its SGD optimizer and sparse categorical cross-entropy,
    trained by model.fit on NumPy arrays (shuffled, verbose=0), each epoch
    timed by a callback. One untimed epoch on a few batches compiles the
    train step first, for the full batch and for the last, shorter one."""
    os.environ["KERAS_BACKEND"] = keras_backend()
    import keras
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(0)
    layers = [keras.Input((sizes[0],))]
    layers += [keras.layers.Dense(width, activation=activation) for width in sizes[1:-1]]
    layers.append(keras.layers.Dense(sizes[-1], activation="softmax"))
    model = keras.Sequential(layers)

    def start_weights():
        for layer, w, b in zip(model.layers, *initial_weights(sizes)):
            layer.set_weights([w, b])

    start_weights()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr),
                  loss="sparse_categorical_crossentropy")
    X = x_train.astype(np.float32) / 255
    y = y_train.astype(np.int32)
    warm_rows = batch_size + len(X) % batch_size
    model.fit(X[:warm_rows], y[:warm_rows], batch_size=batch_size, epochs=1, verbose=0)
    start_weights()  # (the warm-up moved them: train from the shared start again)

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            wait_turn(epoch)
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    timer = EpochTimes()
    model.fit(X, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[timer])
    proba = model.predict(x_test.astype(np.float32) / 255, batch_size=1000, verbose=0)
    return timer.times, float(np.mean(np.asarray(proba).argmax(axis=1) == y_test))


def run_sklearn(workload, data, epochs):
    from sklearn.neural_network import MLPClassifier
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    x_train, y_train, x_test, y_test = data
    X = x_train.astype(np.float32) / 255
    clf = MLPClassifier(hidden_layer_sizes=tuple(sizes[1:-1]),
                        activation={"sigmoid": "logistic"}.get(activation, activation),
                        solver="sgd", learning_rate_init=lr, momentum=0.0, alpha=0.0,
                        batch_size=batch_size, random_state=0)
    times = []
    for epoch in range(epochs):
        wait_turn(epoch)
        start = time.perf_counter()
        clf.partial_fit(X, y_train, classes=np.arange(10))
        times.append(time.perf_counter() - start)
    return times, float(clf.score(x_test.astype(np.float32) / 255, y_test))


SKLEARN_SETTINGS = dict(hidden_layer_sizes=(100,), solver="adam", batch_size=200, max_iter=20,
                        n_iter_no_change=1000, random_state=0)
# whole-data L-BFGS: 50 iterations, each one or more passes over all rows
LBFGS_SETTINGS = dict(hidden_layer_sizes=(100,), solver="lbfgs", max_iter=50, random_state=0)


def input_dtypes(spec):
    """(input dtype, fastmlp's dtype) of a row: "float64" trains both in
    float64, as each does by default; "float64:float32" gives both float64
    input and fastmlp dtype="float32"."""
    given, _, trained = spec.partition(":")
    return given, trained or None


def run_estimator(which, spec, data, settings=SKLEARN_SETTINGS):
    """scikit-learn's MLPClassifier or fastmlp's, same hyperparameters,
    pixels scaled to [0, 1] in the input dtype for both (both train in the
    input's dtype, unless spec gives fastmlp another); returns (fit seconds,
    test accuracy)."""
    x_train, y_train, x_test, y_test = data
    given, trained = input_dtypes(spec)
    return timed_fit(which, "MLPClassifier", settings, x_train.astype(given) / 255,
                     y_train, x_test.astype(given) / 255, y_test, trained)


def timed_fit(which, name, settings, x_train, y_train, x_test, y_test, dtype=None):
    """(seconds, test score) of one fit of scikit-learn's or fastmlp's
    estimator `name` (fastmlp's with `dtype`)."""
    model, seconds = fit_estimator(which, name, settings, x_train, y_train, dtype)
    return seconds, float(model.score(x_test, y_test))


def fit_estimator(which, name, settings, x_train, y_train, dtype):
    """scikit-learn's or fastmlp's estimator `name` (fastmlp's with `dtype`)
    fitted, and the seconds of its fit; fastmlp compiles (or loads its cache)
    before the timing."""
    import warnings
    if which == "fastmlp":
        import fastmlp as module
        settings = {**settings, "dtype": dtype}
    else:
        import sklearn.neural_network as module
    estimator = getattr(module, name)
    if which == "fastmlp":
        estimator(**{**settings, "max_iter": 1}).fit(x_train[:400], y_train[:400])
    model = estimator(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached, on purpose
        start = time.perf_counter()
        model.fit(x_train, y_train)
        seconds = time.perf_counter() - start
    return model, seconds


# rows of the estimator comparisons: input dtype[:fastmlp's dtype]
DTYPE_ROWS = ("float32", "float64", "float64:float32")


def compare_estimators(rounds):
    """MLPClassifier on Fashion-MNIST: float32 and float64 input, float64
    input that fastmlp trains in float32, and float32 input that it trains
    in bfloat16."""
    print(f"\nMLPClassifier, Fashion-MNIST, {SKLEARN_SETTINGS}, {rounds} rounds")
    compare_fits("--estimator", "test acc", DTYPE_ROWS + ("float32:bfloat16",), rounds)


def compare_lbfgs(rounds):
    """MLPClassifier(solver="lbfgs") on Fashion-MNIST, as compare_estimators."""
    print(f"\nMLPClassifier, Fashion-MNIST, {LBFGS_SETTINGS}, {rounds} rounds")
    compare_fits("--lbfgs-fit", "test acc", DTYPE_ROWS, rounds)


def compare_fits(flag, score_name, dtypes, rounds):
    """Each round fits scikit-learn's estimator and then fastmlp's, each in
    a process of its own (this script with `flag`); prints, per input dtype,
    the median fit time of each and the median of the rounds' speed-ups (a
    round's two fits run back to back, so a noisy minute hits both)."""
    print(f"{'input:fastmlp':15} {'estimator':10} {'fit s':>8} {'speed-up':>9} {score_name:>9}  "
          f"speed-ups by round")
    for dtype in dtypes:
        seconds = {"sklearn": [], "fastmlp": []}
        scores = {}
        trips = []
        for _ in range(rounds):
            trips.append(round_trip())
            for which in seconds:
                out = subprocess.run([sys.executable, __file__, flag, which, dtype],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{dtype:15} {which:10} failed: "
                          f"{out.stderr.strip().splitlines()[-1:]}")
                    return
                result = json.loads(out.stdout.strip().splitlines()[-1])
                seconds[which].append(result["seconds"])
                scores[which] = result["score"]
        speedups = [a / b for a, b in zip(seconds["sklearn"], seconds["fastmlp"])]
        for which, times in seconds.items():
            speedup = float(np.median(speedups)) if which == "fastmlp" else 1.0
            by_round = " ".join(f"{x:.2f}" for x in speedups) if which == "fastmlp" else ""
            print(f"{dtype:15} {which:10} {np.median(times):8.2f} {speedup:9.2f} "
                  f"{scores[which]:9.4f}  {by_round}")
        print(f"{'':15} {round_trips_line(trips)}")


REGRESSION_SETTINGS = dict(hidden_layer_sizes=(128, 64), solver="adam", batch_size=200,
                           max_iter=20, n_iter_no_change=1000, random_state=0)


def regression_data():
    """The issue's regression problem: make_regression, 200,000 x 100, 60
    informative features, noise 10, standardized (X and y, with the training
    rows' statistics), 80/20 split."""
    from sklearn.datasets import make_regression
    from sklearn.model_selection import train_test_split
    X, y = make_regression(n_samples=200_000, n_features=100, n_informative=60, noise=10,
                           random_state=0)
    x_train, x_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    y_mean, y_std = y_train.mean(), y_train.std()
    return ((x_train - mean) / std, (y_train - y_mean) / y_std,
            (x_test - mean) / std, (y_test - y_mean) / y_std)


def run_regressor(which, spec):
    """scikit-learn's MLPRegressor or fastmlp's on regression_data in the
    input dtype of spec (see input_dtypes); returns (fit seconds, test R²)."""
    given, trained = input_dtypes(spec)
    return timed_fit(which, "MLPRegressor", REGRESSION_SETTINGS,
                     *(a.astype(given) for a in regression_data()), trained)


def compare_regressors(rounds):
    """MLPRegressor on regression_data: float32 and float64 (make_regression's)
    input, and float64 input that fastmlp trains in float32."""
    print(f"\nMLPRegressor, make_regression 200,000 x 100, {REGRESSION_SETTINGS}, {rounds} rounds")
    compare_fits("--regressor", "test R2", DTYPE_ROWS, rounds)


def blas_kernel():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    info = [f"{i.get('internal_api')} {i.get('architecture', '')} x{i.get('num_threads')}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(info) or "none"


# variables that pin OpenBLAS's kernel or cache size: unset for the peak only
PINNING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def native_blas_env():
    """This process's environment without PINNING_VARIABLES."""
    return {key: value for key, value in os.environ.items() if key not in PINNING_VARIABLES}


def measure_peak():
    """(sgemm GFLOP/s, BLAS kernel) with OpenBLAS's native kernel: measured
    in a child process whose environment lacks PINNING_VARIABLES."""
    out = subprocess.run([sys.executable, __file__, "--peak"], env=native_blas_env(),
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["gflops"], result["blas"]


def round_trip():
    """two_cores.round_trip_ns (None with fewer than two CPUs)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import two_cores
    return two_cores.round_trip_ns()


def round_trips_line(trips, by_round=True):
    """The round trips measured (by round), or what kept them from being."""
    if any(trip is None for trip in trips):
        return "cache line round trip: fewer than two CPUs"
    label = " by round" if by_round else ""
    return (f"cache line round trip between the first two CPUs{label}: "
            f"{' '.join(f'{trip:.0f}' for trip in trips)} ns")


def peak_shares(rates, peaks, flops):
    """{peer: median over the rounds of its FLOP rate over that round's
    sgemm peak} from rates {peer: [epochs/s of each round, or None]} and
    peaks [GFLOP/s of each round]; nan for a peer that never ran."""
    shares = {}
    for peer, peer_rates in rates.items():
        ran = [rate * flops / 1e9 / peak for rate, peak in zip(peer_rates, peaks)
               if rate is not None]
        shares[peer] = float(np.median(ran)) if ran else float("nan")
    return shares


def machine_summary():
    """The CPU, and what fastmlp's kernels are compiled for on it."""
    from fastmlp.microkernel import compiled_target, panel_vectors
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from fastmlp import amx
    from fastmlp.bfloat16 import native_support
    name, bits = compiled_target()
    bf16 = ", ".join(native_support()) or "none"
    how = (f"fastmlp_bf16 runs its layers of 32 or more outputs on {amx.products_name()}"
           if amx.usable() else "fastmlp_bf16 emulates them in float32")
    return (f"CPU: {model}; LLVM CPU name: {name}; microkernels: {bits}-bit vectors, "
            f"4 rows x up to {panel_vectors(bits)} vectors; bfloat16 instructions: {bf16} "
            f"({how})")


def peer_kernels(peer):
    """What multiplied the peer's matrices: XLA compiles its own kernels (JAX,
    and Keras on JAX), the others call NumPy's or PyTorch's BLAS."""
    if peer == "keras":
        import keras
        backend = f"Keras {keras.__version__} on {keras.backend.backend()}: "
        return backend + ("XLA's own kernels" if keras.backend.backend() == "jax"
                          else blas_kernel())
    return "XLA's own kernels" if peer == "jax" else blas_kernel()


def serve(peer, workload, epochs, rounds):
    """A peer's process: warms up, then trains rounds turns of `epochs`
    timed epochs, each when the coordinator says go (wait_turn), and prints
    RESULT and its results as JSON."""
    global TURN_EPOCHS
    TURN_EPOCHS = epochs
    data = load_data()
    times, accuracy = globals()[f"run_{peer}"](workload, data, epochs * rounds)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    blas = peer_kernels(peer)
    if FIT_THREADS is not None:
        blas = f"trained on {FIT_THREADS} thread(s); {blas}"
    print(RESULT + json.dumps({"epoch_times": times, "accuracy": accuracy, "rss_mb": rss_mb,
                               "blas": blas}), flush=True)


class Peer:
    """The coordinator's side of a peer's process (serve): started warming
    up; `turn()` lets it train one turn and waits until it is done."""

    def __init__(self, peer, workload, epochs, rounds):
        self.name = peer
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--epochs", str(epochs), "--rounds", str(rounds),
             "--serve", peer, workload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)
        self.result = None

    def wait(self):
        """Reads the process's output to its next READY (True) or RESULT
        (kept in .result); False if it ended without either."""
        for line in self.process.stdout:  # (libraries may print lines of their own)
            if line.startswith(READY):
                return True
            if line.startswith(RESULT):
                self.result = json.loads(line[len(RESULT):])
                return True
        return False

    def turn(self):
        """Runs one turn of epochs; False if the process failed."""
        try:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return False
        return self.wait()

    def error(self):
        """The last line the failed process wrote on stderr."""
        self.process.kill()
        self.process.wait()
        self.errors.seek(0)
        return self.errors.read().strip().splitlines()[-1:]


def round_order(peers, round_index):
    """The peers of round round_index (from 0): --peers order in even
    rounds, reversed in odd ones."""
    return list(peers) if round_index % 2 == 0 else list(peers)[::-1]


def speedups(rates):
    """{peer: (median epochs/s, median of the rounds' fastmlp/peer ratios,
    the ratios by round)} from rates {peer: [epochs/s of each round]};
    a round where fastmlp or the peer did not run gives no ratio."""
    own = rates.get("fastmlp", [])
    summary = {}
    for peer, peer_rates in rates.items():
        ratios = [a / b for a, b in zip(own, peer_rates) if a is not None and b is not None]
        ran = [r for r in peer_rates if r is not None]
        summary[peer] = (float(np.median(ran)) if ran else float("nan"),
                         float(np.median(ratios)) if ratios else float("nan"), ratios)
    return summary


def compare_workload(workload, peers, epochs, rounds, peak):
    """Runs the workload's rounds (see the module's docstring) and prints
    one row per peer; peak, the sgemm GFLOP/s measured at the start, sets
    the header's limit (each round measures its own)."""
    import importlib.util
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    flops = flops_per_epoch(sizes)
    print(f"\n{workload}: {sizes} {activation}, SGD lr {lr}, batch {batch_size}; "
          f"{flops / 1e9:.1f} GFLOP/epoch, limit at sgemm peak {peak * 1e9 / flops:.2f} epochs/s; "
          f"{rounds} round(s)")
    runnable = []
    for peer in peers:
        if importlib.util.find_spec(MODULE_OF[peer]) is None or f"run_{peer}" not in globals():
            print(f"{peer:15} skipped: not installed here")
        elif peer in ("numpy", "sklearn") and workload == "W3":
            print(f"{peer:15} skipped: too slow for W3")
        else:
            runnable.append(peer)
    rates = {peer: [None] * rounds for peer in runnable}
    peaks, trips = [], []
    processes, failed = {}, {}
    for peer in runnable:  # one at a time: no warm-up runs beside another
        processes[peer] = Peer(peer, workload, epochs, rounds)
        if not processes[peer].wait():
            failed[peer] = processes.pop(peer).error()
    for round_index in range(rounds):
        peaks.append(measure_peak()[0])
        trips.append(round_trip())
        for peer in round_order(runnable, round_index):
            if peer in processes and not processes[peer].turn():
                failed[peer] = processes.pop(peer).error()
    last = {}
    for peer, process in processes.items():
        process.process.wait()
        if process.result is None:
            failed[peer] = process.error()
            continue
        last[peer] = process.result
        times = process.result["epoch_times"]
        for round_index in range(rounds):
            rates[peer][round_index] = 1 / float(
                np.median(times[round_index * epochs:(round_index + 1) * epochs]))
    print(f"{'peer':15} {'epochs/s':>9} {'fastmlp x':>9} {'% peak':>7} {'test acc':>9} "
          f"{'RSS MB':>7}  {'fastmlp x by round':18}  BLAS")
    shares = peak_shares(rates, peaks, flops)
    for peer, (rate, ratio, ratios) in speedups(rates).items():
        if peer in failed:
            print(f"{peer:15} failed: {failed[peer]}")
            continue
        result = last[peer]
        by_round = " ".join(f"{x:.2f}" for x in ratios) if peer != "fastmlp" else ""
        print(f"{peer:15} {rate:9.2f} {ratio:9.2f} {100 * shares[peer]:6.0f}% "
              f"{result['accuracy']:9.4f} {result['rss_mb']:7.0f}  {by_round:18}  "
              f"{result['blas']}")
    print(f"sgemm peak by round: {' '.join(f'{p:.0f}' for p in peaks)} GFLOP/s")
    print(round_trips_line(trips))
    for line in bfloat16_lines(rates, failed):
        print(line)


def bfloat16_lines(rates, failed):
    """fastmlp_bf16's speed-ups over PyTorch's bf16 autocast and over
    fastmlp's float32, as medians of the rounds' ratios, when both ran."""
    lines = []
    for peer, label in (("torch_bf16", "PyTorch's bf16 autocast"), ("fastmlp", "float32")):
        if "fastmlp_bf16" not in rates or peer not in rates or {peer, "fastmlp_bf16"} & set(failed):
            continue
        ratios = [a / b for a, b in zip(rates["fastmlp_bf16"], rates[peer])
                  if a is not None and b is not None]
        if ratios:
            lines.append(f"fastmlp_bf16 over {label}: {float(np.median(ratios)):.2f}x "
                         f"(by round: {' '.join(f'{r:.2f}' for r in ratios)})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--sklearn", action="store_true",
                        help="also compare fastmlp.MLPClassifier with scikit-learn's, fitting "
                             "each in turn (see --rounds)")
    parser.add_argument("--regression", action="store_true",
                        help="also compare fastmlp.MLPRegressor with scikit-learn's")
    parser.add_argument("--lbfgs", action="store_true",
                        help="also compare fastmlp.MLPClassifier(solver='lbfgs') with "
                             "scikit-learn's")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every comparison: medians over them")
    parser.add_argument("--regressor", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--estimator", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--lbfgs-fit", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    unknown = [peer for peer in args.peers.split(",") if peer not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    unknown = [w for w in filter(None, args.workloads.split(",")) if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(WORKLOADS)}")
    if args.peak:
        gflops = sgemm_gflops()
        print(json.dumps({"gflops": gflops, "blas": blas_kernel()}))
        return 0
    if args.serve:
        serve(args.serve[0], args.serve[1], args.epochs, args.rounds)
        return 0
    if args.estimator:
        seconds, accuracy = run_estimator(*args.estimator, load_data())
        print(json.dumps({"seconds": seconds, "score": accuracy}))
        return 0
    if args.lbfgs_fit:
        seconds, accuracy = run_estimator(*args.lbfgs_fit, load_data(), LBFGS_SETTINGS)
        print(json.dumps({"seconds": seconds, "score": accuracy}))
        return 0
    if args.regressor:
        seconds, r2 = run_regressor(*args.regressor)
        print(json.dumps({"seconds": seconds, "score": r2}))
        return 0
    print(machine_summary())
    peak, native = measure_peak()
    pinned = ", ".join(f"{key}={os.environ[key]}" for key in PINNING_VARIABLES
                       if key in os.environ)
    print(f"sgemm peak (NumPy, float32, 1024^3), OpenBLAS's native kernel ({native}"
          f"{'; ' + pinned + ' unset for it' if pinned else ''}): {peak:.0f} GFLOP/s; "
          f"the peers' BLAS: {blas_kernel()}")
    print(round_trips_line([round_trip()], by_round=False))
    for workload in filter(None, args.workloads.split(",")):
        compare_workload(workload, args.peers.split(","), args.epochs, args.rounds, peak)
    if args.sklearn:
        compare_estimators(args.rounds)
    if args.regression:
        compare_regressors(args.rounds)
    if args.lbfgs:
        compare_lbfgs(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
