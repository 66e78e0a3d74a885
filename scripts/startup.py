"""Start-up, memory and inference: fastmlp against PyTorch, back to back.

    python scripts/startup.py [--rounds 3]

1. Whole processes: `fastmlp-train --dataset fashion-mnist --epochs 1 --quiet`
   with Numba's cache warm, and an equivalent PyTorch script (load the same
   IDX files, one SGD epoch of 784-50-10 sigmoid at batch 100, test
   accuracy), alternated for --rounds rounds: wall time and peak RSS
   (/usr/bin/time). Then fastmlp once more with an empty cache
   (NUMBA_CACHE_DIR pointed at a new directory): the cold start, almost all
   of it compilation.
2. Inference: predict_proba on the 10,000 test rows against PyTorch's
   forward pass under no_grad, both 2 threads, alternated, medians of 21.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

TORCH_SCRIPT = """
import numpy as np, torch
from fastmlp.datasets import load
x, y, xt, yt = load("fashion-mnist")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.Sigmoid(), torch.nn.Linear(50, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = torch.nn.CrossEntropyLoss()
X = torch.from_numpy(x.astype(np.float32) / 255); Y = torch.from_numpy(y.astype(np.int64))
order = torch.randperm(len(X))
for s in range(0, len(X), 100):
    rows = order[s:s + 100]
    opt.zero_grad(); loss_fn(model(X[rows]), Y[rows]).backward(); opt.step()
with torch.no_grad():
    acc = (model(torch.from_numpy(xt.astype(np.float32) / 255)).argmax(1).numpy() == yt).mean()
print(f"test accuracy {acc:.4f}")
"""
FASTMLP = ["fastmlp-train", "--dataset", "fashion-mnist", "--epochs", "1", "--quiet"]


def timed(argv, env=None):
    """(wall seconds, peak RSS MB) of a whole process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + argv, capture_output=True, text=True,
                          env=env, check=True)
    seconds = time.perf_counter() - start
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024


def inference(rounds=21):
    import torch
    import fastmlp
    from fastmlp.datasets import load
    x, y, xt, yt = load("fashion-mnist")
    model = fastmlp.MLP([784, 50, 10], seed=0)
    fastmlp.fit(model, x, y, epochs=1, lr=0.1, seed=0)
    torch.set_num_threads(2)
    net = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.Sigmoid(),
                              torch.nn.Linear(50, 10))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(model.weights[0].T.copy()))
        net[0].bias.copy_(torch.from_numpy(model.biases[0]))
        net[2].weight.copy_(torch.from_numpy(model.weights[1].T.copy()))
        net[2].bias.copy_(torch.from_numpy(model.biases[1]))
    xt_float = torch.from_numpy(xt.astype(np.float32) / 255)
    model.predict_proba(xt)  # compile or load
    times = {"fastmlp predict_proba (uint8 rows)": [], "PyTorch forward + softmax (float32)": []}
    for _ in range(rounds):
        start = time.perf_counter()
        ours = model.predict_proba(xt)
        times["fastmlp predict_proba (uint8 rows)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            theirs = torch.softmax(net(xt_float), dim=1).numpy()
        times["PyTorch forward + softmax (float32)"].append(time.perf_counter() - start)
    assert np.abs(ours - theirs).max() < 1e-5  # the same function
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    subprocess.run(FASTMLP, check=True, capture_output=True)  # warm the cache
    runs = {"fastmlp-train, warm cache": [], "PyTorch script": []}
    for _ in range(args.rounds):
        runs["fastmlp-train, warm cache"].append(timed(FASTMLP))
        runs["PyTorch script"].append(timed([sys.executable, "-c", TORCH_SCRIPT]))
    with tempfile.TemporaryDirectory() as cache:
        cold = timed(FASTMLP, env=dict(os.environ, NUMBA_CACHE_DIR=cache))
    print(f"{'whole process':<28}{'seconds (min-max)':>20}{'peak RSS MB':>14}")
    for name, results in runs.items():
        seconds = [s for s, _ in results]
        print(f"{name:<28}{min(seconds):>9.2f} - {max(seconds):<8.2f}"
              f"{statistics.median(r for _, r in results):>14.0f}")
    print(f"{'fastmlp-train, cold cache':<28}{cold[0]:>9.2f}{'':>11}{cold[1]:>14.0f}")
    ours = statistics.median(s for s, _ in runs["fastmlp-train, warm cache"])
    theirs = statistics.median(s for s, _ in runs["PyTorch script"])
    print(f"warm start / PyTorch: {ours / theirs:.2f}")
    print("\ninference on the 10,000 test rows, 2 threads, median of 21:")
    for name, seconds in inference().items():
        print(f"  {name:<40}{seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
