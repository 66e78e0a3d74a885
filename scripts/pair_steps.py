"""The training step of two versions of fastmlp, paired in one process.

    python scripts/pair_steps.py --before HEAD~1                   # HEAD~1 against the working tree
    python scripts/pair_steps.py --before 28c5601 --after HEAD --workload W3 --threads 1
    python scripts/pair_steps.py --before HEAD~1 --sizes 100-128-64-1 --batch 200 \\
        --rows 200000 --input float32 --output linear --optimizer adam
    python scripts/pair_steps.py --before HEAD~1 --sizes 784-100-10 --activation relu \\
        --batch 200 --optimizer adam --input float32 --data fashion-mnist   # MLPClassifier's

On a shared machine a step's time moves by up to 2x from one minute to the
next, so two versions timed in separate runs, even alternated, compare the
minutes as much as the code. Here both versions are loaded into one
process, as two packages (copies of fastmlp/ renamed fastmlp_before and
fastmlp_after: its imports are relative), each with a model on the same
random data, and their `train_steps` alternate, --steps steps a turn. It
prints the median time per step of each and the median of the after/before
ratios over the rounds, with its quartiles.

The package loaded and run first is faster: the same code against
itself measured 1.14 to 1.21 on W1 in one hour (Zen 3; models of two
copies of one revision set up A-A-B ran 187, 188 and 228 us a step), and
in another hour the two orders of one pair gave 0.71 and 1.48 (see
docs/performance.md). So the comparison runs twice, in a child process
for each order, and the answer is the geometric mean of the two medians;
when the two orders are that far apart, it cannot resolve a few percent.

The first run of a version compiles it (about a minute each); a version
named by a git revision keeps its Numba cache under --cache-dir, the working
tree compiles anew each time. Pin one thread with taskset for 1-thread
figures. For another CPU's code generation, set NUMBA_CPU_NAME (and
NUMBA_CPU_FEATURES="" where the host lacks its features) and a --cache-dir
of its own.
"""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from workloads import WORKLOADS  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def package_copy(revision, name, cache_dir, scratch):
    """A directory holding fastmlp as of `revision` (a git revision, or
    "worktree" for the files as they are) under the package name `name`."""
    if revision == "worktree":
        parent = os.path.join(scratch, name)
        shutil.copytree(os.path.join(ROOT, "fastmlp"), os.path.join(parent, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
        return parent
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", revision],
                            capture_output=True, text=True, check=True).stdout.strip()
    parent = os.path.join(cache_dir, commit)
    if not os.path.isdir(os.path.join(parent, name)):
        os.makedirs(parent, exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "fastmlp"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", parent], input=archive, check=True)
        os.rename(os.path.join(parent, "fastmlp"), os.path.join(parent, name))
    return parent


def step_setup(name, args, X, y, order):
    """(train_steps, its arguments) for a new model of package `name`."""
    package = importlib.import_module(name)
    training = importlib.import_module(name + ".training")
    step = importlib.import_module(name + ".step")
    model = package.MLP(args.layer_sizes, activation=args.activation, dtype=args.dtype,
                        output=args.output, seed=0)
    lr = 1e-3 if args.optimizer == "adam" else args.lr
    state = training.optimizer_state(model, args.optimizer, (lr, 0.9, False, 0.0), None)
    model.training_state = training.TrainingState(0)
    loop = training.EpochLoop(model, state, X, y, np.ones(len(X), model.dtype), args.batch,
                              True, "epoch", None)
    loop.idx[:] = order
    return step.train_steps, loop.step_arguments(0, 1)[:5]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[2].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the first version")
    parser.add_argument("--after", default="worktree",
                        help='git revision of the second version, or "worktree"')
    parser.add_argument("--workload", default="W1", choices=sorted(WORKLOADS),
                        help="layer sizes, activation and batch of a benchmark workload")
    parser.add_argument("--sizes", help="layer sizes instead, e.g. 100-128-64-1")
    parser.add_argument("--batch", type=int, help="batch size instead of the workload's")
    parser.add_argument("--activation", help="hidden activation instead of the workload's")
    parser.add_argument("--output", default="softmax", choices=["softmax", "linear"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64",
                                                                "bfloat16"])
    parser.add_argument("--input", default="uint8", choices=["uint8", "float32", "float64"],
                        help="dtype of the training rows")
    parser.add_argument("--rows", type=int, default=60000, help="rows of training data")
    parser.add_argument("--data", default="random", choices=["random", "fashion-mnist"],
                        help="random rows, or Fashion-MNIST's training images (pixels "
                             "scaled to [0, 1] unless --input uint8; its 60,000 rows at most)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    parser.add_argument("--lr", type=float,
                        help="learning rate of sgd/momentum (default: the workload's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100, help="steps a turn")
    parser.add_argument("--first", choices=["before", "after"],
                        help="set up this version first, in this process only (default: "
                             "both orders, each in a child process)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                             "fastmlp-pair-steps"),
                        help="where versions named by a revision keep their code and cache")
    args = parser.parse_args(argv)
    for revision in (args.before, args.after):
        if revision != "worktree" and subprocess.run(
                ["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", revision + "^{commit}"],
                capture_output=True).returncode != 0:
            parser.error(f"{revision!r} is not a git revision of {ROOT}")
    sizes, activation, batch, lr = WORKLOADS[args.workload]
    args.layer_sizes = [int(v) for v in args.sizes.split("-")] if args.sizes else sizes
    args.activation = args.activation or activation
    args.batch = args.batch or batch
    args.lr = args.lr or lr
    if args.data == "fashion-mnist":
        if args.layer_sizes[0] != 784 or args.output != "softmax" or args.layer_sizes[-1] != 10:
            parser.error("--data fashion-mnist needs 784 inputs and 10 softmax outputs")
        args.rows = min(args.rows, 60000)
    if args.batch * 2 > args.rows:
        parser.error("--rows must hold at least two batches")
    if args.first is None:
        return both_orders(sys.argv[1:] if argv is None else argv)

    times = alternate(args, *(random_data(args) if args.data == "random"
                              else fashion_mnist(args)))
    before, after = np.array(times["fastmlp_before"]), np.array(times["fastmlp_after"])
    ratio = after / before
    shape = "-".join(map(str, args.layer_sizes))
    turn = min(args.steps, args.rows // args.batch)
    print(f"{shape} {args.activation}, {args.optimizer}, batch {args.batch}, {args.dtype}, "
          f"{args.threads} thread(s), {args.rounds} rounds of {turn} steps")
    print(f"{args.first} set up first: before {np.median(before):.1f} us/step, after "
          f"{np.median(after):.1f} us/step; after/before {np.median(ratio):.3f} (quartiles "
          f"{np.quantile(ratio, 0.25):.3f}-{np.quantile(ratio, 0.75):.3f})")
    print(f"RATIO {float(np.median(ratio))!r}")
    return 0


def random_data(args):
    """(X, y, row order) of --rows random rows for the model args describe:
    targets as fit passes them on, (n, k) floats of the model's dtype or
    labels."""
    rng = np.random.default_rng(0)
    n, width = args.rows, args.layer_sizes[0]
    X = (rng.integers(0, 256, (n, width), dtype=np.uint8) if args.input == "uint8"
         else rng.standard_normal((n, width)).astype(args.input))
    y = (rng.standard_normal((n, args.layer_sizes[-1])).astype(
        np.float64 if args.dtype == "float64" else np.float32) if args.output == "linear"
         else rng.integers(0, args.layer_sizes[-1], n).astype(np.int32))
    return X, y, rng.permutation(n)


def fashion_mnist(args):
    """(X, y, row order) of Fashion-MNIST's first --rows training images
    (whose pixels are half zeros) and their labels."""
    sys.path.insert(0, ROOT)
    from fastmlp import datasets
    images, labels, _, _ = datasets.load("fashion-mnist")
    X = images.reshape(len(images), -1)[:args.rows]
    if args.input != "uint8":
        X = X.astype(args.input) / 255
    return X, labels[:args.rows].astype(np.int32), np.random.default_rng(0).permutation(len(X))


def alternate(args, X, y, order):
    """Sets up both versions (in the order --first says), then alternates
    their train_steps, --steps steps a turn, for --rounds rounds; returns
    each version's microseconds per step, turn by turn."""
    import numba
    numba.set_num_threads(args.threads)
    setups = {}
    versions = [("fastmlp_before", args.before), ("fastmlp_after", args.after)]
    if args.first == "after":
        versions.reverse()
    with tempfile.TemporaryDirectory() as scratch:
        for name, revision in versions:
            sys.path.insert(0, package_copy(revision, name, args.cache_dir, scratch))
            start = time.perf_counter()
            train_steps, step_args = step_setup(name, args, X, y, order)
            train_steps(*step_args, 0, 2, 1, args.threads)
            setups[name] = (train_steps, step_args)
            print(f"{name} ({revision}): ready in {time.perf_counter() - start:.1f} s",
                  flush=True)
        steps_per_epoch = len(X) // args.batch
        turn = min(args.steps, steps_per_epoch)
        times = {name: [] for name in setups}
        turns = 0
        for round_ in range(args.rounds):
            names = sorted(setups) if round_ % 2 == 0 else sorted(setups)[::-1]
            for name in names:
                train_steps, step_args = setups[name]
                step0 = turns * turn % (steps_per_epoch - turn + 1)
                turns += 1
                start = time.perf_counter()
                train_steps(*step_args, step0, step0 + turn, 1, args.threads)
                times[name].append((time.perf_counter() - start) / turn * 1e6)
    return times


def both_orders(argv):
    """Runs the comparison in a child process for each setup order; prints
    their results and the geometric mean of their median ratios."""
    ratios = []
    for first in ("before", "after"):
        child = subprocess.run([sys.executable, __file__, *argv, "--first", first],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.stderr.write(child.stdout + child.stderr)
            return child.returncode
        for line in child.stdout.splitlines():
            if line.startswith("RATIO "):
                ratios.append(float(line.split()[1]))
            else:
                print(line, flush=True)
    print(f"after/before, both orders: {np.sqrt(ratios[0] * ratios[1]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
