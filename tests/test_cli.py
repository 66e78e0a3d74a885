"""fastmlp-train, through main(argv) and once as the installed command."""
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastmlp
import fastmlp.datasets
from fastmlp.cli import main
from fastmlp.progress import PREDICT_COMPILE_NOTICE, ProgressPrinter

from test_datasets import write_dataset

EPOCH_LINE = re.compile(r"^\d+/\d+ - \d+\.\d\ds - \d+us/step - loss: \d\.\d{4} - accuracy: \d\.\d{4}"
                        r" - val_loss: \d\.\d{4} - val_accuracy: \d\.\d{4}$")


@pytest.fixture
def data_dir(tmp_path):
    write_dataset(tmp_path / "data", n_train=250, n_test=50)
    return str(tmp_path / "data")


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_training_prints_summary_progress_and_results(data_dir, capsys):
    code, out, err = run(["--data-dir", data_dir, "--epochs", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert 'Model: "784-50-10" (float32)' in lines
    assert any(re.match(r"dense_1 \(sigmoid\)\s+\(None, 50\)\s+39,250$", l) for l in lines)
    assert any(re.match(r"dense_2 \(softmax\)\s+\(None, 10\)\s+510$", l) for l in lines)
    assert "Total params: 39,760" in lines
    assert sum(l.startswith("JIT compile: ") for l in lines) == 1
    assert lines.count("Epoch 1/2") == 1 and lines.count("Epoch 2/2") == 1
    epoch_lines = [l for l in lines if l.startswith("3/3 - ")]
    assert len(epoch_lines) == 2 and all(EPOCH_LINE.match(l) for l in epoch_lines)
    assert re.search(r"^Test loss: \d\.\d{4} - test accuracy: \d\.\d{4}$", out, re.M)
    assert re.search(r"^Trained 2 epochs in .*epochs/s", out, re.M)


def test_history_files_and_plot(data_dir, tmp_path, capsys):
    csv_path, json_path, png = tmp_path / "h.csv", tmp_path / "h.json", tmp_path / "c.png"
    assert run(["--data-dir", data_dir, "--epochs", "3", "--quiet", "--history", str(csv_path),
                "--plot", str(png)], capsys)[0] == 0
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                            "epoch_time"}
    assert float(rows[2]["loss"]) < float(rows[0]["loss"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    assert run(["--data-dir", data_dir, "--epochs", "1", "--quiet", "--history", str(json_path)],
               capsys)[0] == 0
    assert json.loads(json_path.read_text())[0]["epoch"] == 1


def test_a_history_that_cannot_be_written_loses_no_model(data_dir, tmp_path, capsys):
    (tmp_path / "h.csv").mkdir()  # in the way of the history file
    model_path = tmp_path / "m.safetensors"
    code, out, err = run(["--data-dir", data_dir, "--epochs", "1", "--quiet", "--history",
                          str(tmp_path / "h.csv"), "--save", str(model_path)], capsys)
    assert code == 2 and "h.csv" in err and err.startswith("fastmlp-train: error: ")
    assert f"Saved {model_path}" in out and fastmlp.load(model_path).training_state.epoch == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fastmlp-")] == []


def test_the_plot_names_the_rows_it_reports_on(tmp_path, monkeypatch):
    # a test set is "test", rows held out of --data are "held-out"
    import matplotlib.figure

    from fastmlp.cli import plot_history
    from fastmlp.training import History
    history = History("accuracy")
    history.epoch = [0, 1]
    history.history = {"loss": [1.0, 0.5], "accuracy": [0.5, 0.7], "val_loss": [1.1, 0.6],
                       "val_accuracy": [0.4, 0.6]}
    labels = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, path, **_: labels.append(
        [[text.get_text() for text in axis.get_legend().get_texts()] for axis in figure.axes]))
    plot_history(history, tmp_path / "a.png")
    plot_history(history, tmp_path / "b.png", "held-out")
    assert labels == [[["train", "test"]] * 2, [["train", "held-out"]] * 2]


def test_save_evaluate_and_resume_equals_a_straight_run(data_dir, tmp_path, capsys):
    common = ["--data-dir", data_dir, "--quiet", "--optimizer", "adam", "--hidden", "16,8",
              "--activation", "relu"]
    straight, half, resumed = tmp_path / "s.fmlp", tmp_path / "h.fmlp", tmp_path / "r.fmlp"
    assert run(common + ["--epochs", "4", "--save", str(straight)], capsys)[0] == 0
    assert run(common + ["--epochs", "2", "--save", str(half)], capsys)[0] == 0
    code, out, err = run(["--data-dir", data_dir, "--quiet", "--resume", str(half),
                          "--epochs", "4", "--save", str(resumed)], capsys)
    assert code == 0, err
    assert np.array_equal(fastmlp.load(straight).params, fastmlp.load(resumed).params)
    assert fastmlp.load(resumed).optimizer_state.name == "adam"
    # the model file knows its data: --evaluate needs no other flag
    code, out, _ = run(["--evaluate", str(resumed)], capsys)
    x_test, y_test = fastmlp.datasets.load_directory(data_dir)[2:]
    loss, accuracy = fastmlp.load(resumed).evaluate(x_test, y_test)
    assert code == 0
    assert out.strip() == (f"{resumed}: test loss {loss:.4f} - test accuracy {accuracy:.4f} "
                           "(50 test rows of mnist)")


def test_evaluate_says_when_it_compiles_first(data_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.fmlp"
    assert run(["--data-dir", data_dir, "--quiet", "--epochs", "1", "--save", str(path)],
               capsys)[0] == 0
    code, out, _ = run(["--evaluate", str(path)], capsys)
    assert code == 0 and out.startswith(f"{path}: test loss ")  # compiled by the training
    monkeypatch.setattr(fastmlp.MLP, "prediction_ready", lambda self: False)
    code, again, _ = run(["--evaluate", str(path)], capsys)
    assert code == 0 and again == f"{PREDICT_COMPILE_NOTICE}...\n{out}"


@pytest.mark.parametrize("argv,message", [
    (["--hidden", "a,b"], "--hidden takes comma-separated integers"),
    (["--lr", "-1"], None),
    (["--history", "h.txt"], None),
    (["--batch-size", "0"], None),
    (["--evaluate", "x", "--save", "y"], None),
    (["--activation", "softsign"], None),
    (["--monitor", "val_accuracy"], "--monitor says what --patience or --lr-schedule plateau "
                                    "watch: it goes with one of them"),
    (["--min-delta", "0.01"], "--min-delta is for early stopping: it goes with --patience N"),
    (["--patience", "2", "--monitor", "r2"],
     "--monitor r2 is not a metric of this model: its output is softmax, whose metric is "
     "accuracy"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--save", "/nonexistent/m.safetensors"],
     "--save /nonexistent/m.safetensors: there is no directory /nonexistent"),
    (["--plot", "/nonexistent/curves.png"], "there is no directory /nonexistent"),
])
def test_usage_errors_exit_2(data_dir, capsys, argv, message):
    try:
        code = main(["--data-dir", data_dir, "--epochs", "1"] + argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    if message:
        assert message in err


def test_plot_without_matplotlib_is_a_usage_error(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as info:
        main(["--data-dir", data_dir, "--plot", str(tmp_path / "c.png")])
    assert info.value.code == 2
    assert "--plot needs matplotlib: pip install 'fastmlp[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_bad_input_exits_2_with_one_line(tmp_path, data_dir, capsys):
    (tmp_path / "bad.fmlp").write_bytes(b"garbage")
    for argv in (["--evaluate", str(tmp_path / "bad.fmlp"), "--data-dir", data_dir],
                 ["--evaluate", str(tmp_path / "missing.fmlp"), "--data-dir", data_dir],
                 ["--dataset", "mnist", "--no-download", "--data-dir", str(tmp_path / "empty")]):
        code, out, err = run(argv, capsys)
        assert code == 2
        first, *rest = err.splitlines()
        assert first.startswith("fastmlp-train: error: ") and "Traceback" not in err
        # a dataset that is missing is followed by those that are here
        assert rest == [] or (rest[0] == "available now:"
                              and all(line.startswith("  fastmlp-train --dataset ")
                                      for line in rest[1:]))


def test_resume_refuses_architecture_flags(data_dir, tmp_path, capsys):
    path = tmp_path / "m.fmlp"
    run(["--data-dir", data_dir, "--epochs", "1", "--quiet", "--save", str(path)], capsys)
    with pytest.raises(SystemExit) as info:
        main(["--data-dir", data_dir, "--resume", str(path), "--hidden", "3"])
    assert info.value.code == 2
    code, _, err = run(["--data-dir", data_dir, "--resume", str(path), "--epochs", "1"], capsys)
    assert code == 2 and "trained 1 epoch already" in err


def test_progress_redraws_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    printer = ProgressPrinter(stream)
    printer.on_epoch_begin(0, 3, 600)
    printer.on_steps(300, 600, {"loss": 0.5, "accuracy": 0.75})
    printer.on_epoch_end(0, 600, 0.2, {"loss": 0.4, "accuracy": 0.8})
    text = stream.getvalue()
    assert text.startswith("Epoch 1/3\n\r300/600 [")
    assert "ETA" in text and "\r600/600 - 0.20s - 333us/step - loss: 0.4000" in text
    plain = io.StringIO()
    ProgressPrinter(plain).on_steps(300, 600, {"loss": 0.5})
    assert plain.getvalue() == ""  # not a terminal: one line per epoch only


def command():
    path = shutil.which("fastmlp-train")
    assert path, "fastmlp-train is not installed (pip install -e .)"
    return path


def test_the_installed_command_runs(data_dir):
    result = subprocess.run([command(), "--data-dir", data_dir, "--epochs", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Total params: 39,760" in result.stdout and "Epoch 1/1" in result.stdout
    help_text = subprocess.run([command(), "--help"], capture_output=True, text=True).stdout
    assert "examples:" in help_text and "(default: 100;" in help_text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_resumable_checkpoint_and_exits_130(tmp_path, sig):
    path = tmp_path / "ck.fmlp"
    proc = subprocess.Popen([sys.executable, "-m", "fastmlp.cli", "--dataset", "digits",
                             "--epochs", "100000", "--batch-size", "8", "--save", str(path),
                             "--history", str(tmp_path / "h.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training runs
        if line.startswith("Epoch 3/"):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Interrupted; saved" in err
    model = fastmlp.load(path)
    assert model.training_state.epoch >= 2
    assert model.optimizer_state.updates == model.training_state.epoch * 180 + model.training_state.step
    # --history has a row for each epoch completed (but one whose steps
    # ended as the interrupt came, before its metrics were taken)
    rows = (tmp_path / "h.csv").read_text().splitlines()[1:]
    assert 2 <= len(rows) and model.training_state.epoch - 1 <= len(rows) <= model.training_state.epoch
    assert [row.split(",")[0] for row in rows] == [str(e + 1) for e in range(len(rows))]
    # the checkpoint knows its data and batch size: the printed command
    # resumes it with no other flag (and --epochs to end the epoch it is in)
    epoch = model.training_state.epoch
    result = subprocess.run([sys.executable, "-m", "fastmlp", "--resume", str(path), "--epochs",
                             str(epoch + 1), "--save", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Data: dataset digits" in result.stdout and f"Epoch {epoch + 1}/{epoch + 1}" in result.stdout
    resumed = fastmlp.load(path)
    assert resumed.training_state.epoch == epoch + 1 and resumed.training_state.batch_size == 8


def test_divergence_exits_2_and_saves_the_last_finite_parameters(data_dir, tmp_path, capsys):
    path = tmp_path / "d.fmlp"
    code, out, err = run(["--data-dir", data_dir, "--activation", "relu", "--lr", "1e38",
                          "--batch-size", "10", "--epochs", "3", "--save", str(path)], capsys)
    assert code == 2
    assert re.match(r"fastmlp-train: error: training diverged at epoch \d+, step \d+ of 25: "
                    r".*smaller learning rate.*saved the last finite parameters", err)
    model = fastmlp.load(path)
    assert np.isfinite(model.params).all() and model.training_state.step > 0


def test_checkpoint_every_needs_save(data_dir):
    with pytest.raises(SystemExit) as info:
        main(["--data-dir", data_dir, "--checkpoint-every", "2"])
    assert info.value.code == 2


def test_sigkill_at_random_moments_never_damages_the_checkpoint(tmp_path):
    """Kills the command while it checkpoints every epoch, many times; the
    file is always loadable, and resuming from the last one reaches the same
    parameters as a run that was never killed."""
    path = tmp_path / "ck.fmlp"
    common = [sys.executable, "-m", "fastmlp.cli", "--dataset", "digits", "--batch-size", "16"]
    new = ["--hidden", "64", "--activation", "relu"]
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(KILLS):
        argv = common + ["--save", str(path), "--checkpoint-every", "1"]
        # --epochs is the total to reach: far more than any run gets through
        argv += ["--resume", str(path), "--epochs", "10000000"] if path.exists() \
            else new + ["--epochs", "10000000"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:  # training has started
            if line.startswith("Epoch"):
                break
        time.sleep(rng.uniform(0, 1.0))
        proc.kill()
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        if path.exists():
            fastmlp.load(path)  # raises if damaged
        leftovers = [p for p in os.listdir(tmp_path) if p != "ck.fmlp"]
        assert all(p.startswith(".fastmlp-") for p in leftovers)  # at most temporaries
    assert kills == KILLS
    model = fastmlp.load(path)
    epochs = model.training_state.epoch
    assert epochs >= 2  # checkpoints were written and resumed from
    finish = subprocess.run(common + ["--quiet", "--resume", str(path), "--epochs", str(epochs + 2),
                                      "--save", str(path)], capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    straight = tmp_path / "straight.fmlp"
    result = subprocess.run(common + new + ["--quiet", "--epochs", str(epochs + 2), "--save", str(straight)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(fastmlp.load(path).params, fastmlp.load(straight).params)


KILLS = int(os.environ.get("FASTMLP_KILLS", "12"))


def test_early_stopping_flags(data_dir, tmp_path, capsys):
    path = tmp_path / "h.json"
    code, out, err = run(["--data-dir", data_dir, "--epochs", "100", "--patience", "2",
                          "--optimizer", "adam", "--lr", "0.01", "--activation", "relu",
                          "--quiet", "--history", str(path)], capsys)
    assert code == 0, err
    rows = json.loads(path.read_text())
    assert len(rows) < 100
    match = re.search(r"Early stopping after epoch (\d+): no val_loss improvement for 2 epochs; "
                      r"restored epoch (\d+)", out)
    stopped, best = int(match[1]), int(match[2])
    assert stopped == len(rows) == best + 2
    assert min(r["val_loss"] for r in rows) == rows[best - 1]["val_loss"]
    with pytest.raises(SystemExit):
        main(["--data-dir", data_dir, "--patience", "0"])


HIDDEN_SCIPY_SCRIPT = """
import json, sys
import numpy as np
from fastmlp import cli, predict
main = cli.main if sys.argv[1] == "fastmlp-train" else predict.main
sys.argv = sys.argv[1:]
code = main()
import numba, numba.np.arraymath
result = {"code": code, "scipy.linalg": "scipy.linalg" in sys.modules,
          "vector dot by BLAS": numba.np.arraymath._HAVE_BLAS}
import scipy.linalg  # imports as usual afterwards, and so does BLAS for Numba
a = np.arange(6.0).reshape(2, 3)
result["dot"] = numba.njit(lambda a, b: np.dot(a, b))(a, a.T).tolist()
print(json.dumps(result))
"""


def test_the_commands_start_without_scipy_linalg(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.normal(size=(60, 4)), y=rng.integers(0, 3, 60))
    model = str(tmp_path / "m.safetensors")
    for argv in (["fastmlp-train", "--data", str(tmp_path / "d.npz"), "--epochs", "1",
                  "--quiet", "--save", model],
                 ["fastmlp-predict", model, str(tmp_path / "d.npz"), "-o", str(tmp_path / "p.csv")]):
        run = subprocess.run([sys.executable, "-c", HIDDEN_SCIPY_SCRIPT] + argv,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.splitlines()[-1])
        assert result == {"code": 0, "scipy.linalg": False, "vector dot by BLAS": False,
                          "dot": [[5.0, 14.0], [14.0, 50.0]]}, argv[0]
