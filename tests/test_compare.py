"""scripts/compare.py's summary of rounds: speed-ups are medians of ratios
taken within a round, and rounds alternate the peers' order. (The timing
runs themselves take minutes and every peer: they are run by hand.)"""
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import load_script


def test_rounds_alternate_the_order_of_peers():
    compare = load_script("compare")
    peers = ["fastmlp", "jax", "torch"]
    assert compare.round_order(peers, 0) == peers
    assert compare.round_order(peers, 1) == ["torch", "jax", "fastmlp"]
    assert compare.round_order(peers, 2) == peers
    assert peers == ["fastmlp", "jax", "torch"]  # not reversed in place


def test_speedup_is_the_median_of_ratios_within_rounds():
    compare = load_script("compare")
    # the machine slows down 2x in round 1 and fastmlp's run in round 2
    # meets a busy minute: within rounds the ratios are 2, 2 and 3, while
    # the ratio of the median rates (6 / 2.5) would say 2.4
    rates = {"fastmlp": [10.0, 5.0, 6.0], "jax": [5.0, 2.5, 2.0]}
    summary = compare.speedups(rates)
    assert summary["fastmlp"][:2] == (6.0, 1.0)
    rate, ratio, ratios = summary["jax"]
    assert rate == 2.5
    assert ratios == [2.0, 2.0, 3.0]
    assert ratio == 2.0


def test_a_round_that_failed_gives_no_ratio():
    compare = load_script("compare")
    rates = {"fastmlp": [8.0, None, 6.0, 4.0], "torch": [2.0, 1.0, None, 1.0]}
    rate, ratio, ratios = compare.speedups(rates)["torch"]
    assert ratios == [4.0, 4.0]
    assert (rate, ratio) == (1.0, 4.0)
    rate, ratio, ratios = compare.speedups({"torch": [None]})["torch"]
    assert math.isnan(rate) and math.isnan(ratio) and ratios == []


def test_the_bfloat16_lines_are_medians_of_ratios_within_rounds():
    compare = load_script("compare")
    rates = {"fastmlp": [1.0, 0.5, 1.0], "fastmlp_bf16": [3.0, 1.0, None],
             "torch_bf16": [1.0, 0.4, 1.5]}
    lines = compare.bfloat16_lines(rates, failed={})
    assert lines == ["fastmlp_bf16 over PyTorch's bf16 autocast: 2.75x (by round: 3.00 2.50)",
                     "fastmlp_bf16 over float32: 2.50x (by round: 3.00 2.00)"]
    assert compare.bfloat16_lines(rates, failed={"torch_bf16": "crashed"}) == lines[1:]
    assert compare.bfloat16_lines({"fastmlp": [1.0]}, failed={}) == []


def test_every_peer_names_its_module_and_has_a_runner():
    # a peer missing from MODULE_OF would stop the comparison with a
    # KeyError after minutes of runs; one without run_<peer> was reported
    # as "not installed here" even where it was (keras was)
    compare = load_script("compare")
    assert set(compare.MODULE_OF) == set(compare.PEERS)
    for peer in compare.PEERS:
        assert callable(getattr(compare, f"run_{peer}", None)), peer


# peers that start from compare.initial_weights (scikit-learn draws its own)
SHARED_START = ("numpy", "torch", "torch_bf16", "jax", "keras")


@pytest.mark.parametrize("peer", ["fastmlp", "numpy", "torch", "jax", "keras", "sklearn"])
def test_every_installed_peer_trains_a_tiny_workload(peer, monkeypatch):
    # each runner (on the tiny problem below, in this process) times the
    # epochs it is asked for and learns; those that start from the shared
    # weights give, after no epoch, the accuracy of those weights (Keras's
    # warm-up trains, and must start again from them); the peers that are
    # not installed here are skipped
    compare = load_script("compare")
    monkeypatch.setenv("KERAS_BACKEND", compare.keras_backend())
    for module in {compare.MODULE_OF[peer]} | ({compare.keras_backend()} if peer == "keras"
                                               else set()):
        pytest.importorskip(module)
    from fastmlp import reference
    rng = np.random.default_rng(0)
    sizes = [16, 12, 3]
    X = rng.integers(0, 256, (605, 16)).astype(np.uint8)
    y = X[:, :3].argmax(axis=1)  # 3 classes of about a third each
    data = (X[:500], y[:500], X[500:], y[500:])
    monkeypatch.setitem(compare.WORKLOADS, "tiny", (sizes, "sigmoid", 10, 2.0))
    run = getattr(compare, f"run_{peer}")
    weights, biases = compare.initial_weights(sizes)
    start = np.mean(reference.forward(weights, biases, X[500:], "sigmoid")[-1].argmax(axis=1)
                    == y[500:])
    if peer in SHARED_START:
        times, accuracy = run("tiny", data, 0)
        assert list(times) == [] and accuracy == start
    times, trained = run("tiny", data, 3)
    assert len(times) == 3 and min(times) > 0
    assert trained > max(start, 0.6), trained


def cpu_seconds(pid):
    # user + system CPU time of a process so far (Linux)
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_peers_train_only_in_their_turns():
    # each peer's process warms up, then trains a turn of --epochs epochs
    # only when the coordinator says go, and idles in between; its results
    # come after its last turn
    compare = load_script("compare")
    peers = [compare.Peer(name, "W1", 1, 2) for name in ("fastmlp", "numpy")]
    try:
        for peer in peers:
            assert peer.wait() and peer.result is None
        used = [cpu_seconds(peer.process.pid) for peer in peers]
        time.sleep(1.0)
        for peer, before in zip(peers, used):
            assert cpu_seconds(peer.process.pid) - before < 0.2, peer.name
        for peer in peers + peers[::-1]:
            assert peer.result is None
            assert peer.turn()
        for peer in peers:
            assert peer.process.wait(timeout=60) == 0
            assert len(peer.result["epoch_times"]) == 2
            assert 0.75 < peer.result["accuracy"] < 0.9
    finally:
        for peer in peers:
            peer.process.kill()


@pytest.mark.parametrize("argv", [["--peers", "fastmlp,pytorch"], ["--workloads", "W1,W4"],
                                  ["--rounds", "0"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    # refused before the minutes of runs start, naming what is wrong
    with pytest.raises(SystemExit) as stop:
        load_script("compare").main(argv)
    assert stop.value.code == 2
    named = {"--peers": "pytorch", "--workloads": "W4", "--rounds": "--rounds"}[argv[0]]
    assert named in capsys.readouterr().err


def test_a_dtype_row_fits_fastmlp_in_the_dtype_it_names():
    compare = load_script("compare")
    assert compare.input_dtypes("float64") == ("float64", None)
    assert compare.input_dtypes("float64:float32") == ("float64", "float32")
    # float64 input that fastmlp alone trains in float32
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 5))
    y = X @ rng.standard_normal(5)
    settings = dict(hidden_layer_sizes=(8,), max_iter=2, random_state=0)
    dtypes = {}
    for which in ("fastmlp", "sklearn"):
        model, seconds = compare.fit_estimator(which, "MLPRegressor", settings, X, y, "float32")
        assert seconds > 0
        dtypes[which] = model.coefs_[0].dtype
    assert dtypes == {"fastmlp": np.float32, "sklearn": np.float64}
    model, _ = compare.fit_estimator("fastmlp", "MLPRegressor", settings, X, y, None)
    assert model.coefs_[0].dtype == np.float64


def test_the_lbfgs_rows_fit_both_estimators_with_lbfgs():
    compare = load_script("compare")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 5))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    settings = {**compare.LBFGS_SETTINGS, "hidden_layer_sizes": (4,), "max_iter": 3}
    for which in ("fastmlp", "sklearn"):
        model, seconds = compare.fit_estimator(which, "MLPClassifier", settings, X, y, None)
        assert model.solver == "lbfgs" and model.n_iter_ == 3 and seconds > 0
        assert not hasattr(model, "loss_curve_")


def test_share_of_peak_is_the_median_of_rounds_against_their_own_peak():
    compare = load_script("compare")
    # 10 GFLOP an epoch; the machine halves its speed in round 1, and
    # fastmlp did not run in round 2
    rates = {"fastmlp": [8.0, 4.0, None], "jax": [4.0, 2.0, 3.0]}
    shares = compare.peak_shares(rates, [100.0, 50.0, 100.0], 10e9)
    assert shares["fastmlp"] == 0.8  # rounds 0.8, 0.8 (not 6 / 83)
    assert shares["jax"] == 0.4  # rounds 0.4, 0.4, 0.3
    assert math.isnan(compare.peak_shares({"torch": [None]}, [100.0], 1e9)["torch"])


def test_the_peak_runs_openblas_native_kernel(monkeypatch):
    # some machines pin OpenBLAS's kernel (OPENBLAS_CORETYPE); the peak is
    # measured without the pin, and the peers keep it
    compare = load_script("compare")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "65536")
    assert not set(compare.PINNING_VARIABLES) & set(compare.native_blas_env())
    gflops, native = compare.measure_peak()
    assert gflops > 0
    pinned = subprocess.run([sys.executable, compare.__file__, "--peak"], capture_output=True,
                            text=True, check=True).stdout.strip().splitlines()[-1]
    assert native != compare.json.loads(pinned)["blas"]


def test_round_trips_are_printed_by_round_or_said_missing():
    compare = load_script("compare")
    assert compare.round_trips_line([84.6, 341.2]) == (
        "cache line round trip between the first two CPUs by round: 85 341 ns")
    assert compare.round_trips_line([84.6, None]) == (
        "cache line round trip: fewer than two CPUs")
