"""The user's own files: fastmlp-train --data and fastmlp-predict, the data a
model file records, and the first-run behaviour of the command line."""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import fastmlp
from fastmlp import jit, sources, tabular
from fastmlp.cli import main
from fastmlp.predict import main as predict_main
from fastmlp.progress import (COMPILE_NOTICE, PREDICT_COMPILE_NOTICE, UNCACHED_NOTICE,
                              ProgressPrinter)

SPECIES = ["setosa", "versicolor", "virginica"]
FEATURES = ["length", "width", "depth"]


def write_csv(path, features, labels, names=FEATURES, target="species"):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(names) + ([target] if labels is not None else []))
        for i, row in enumerate(features):
            writer.writerow([repr(float(v)) for v in row] + ([labels[i]] if labels is not None else []))
    return str(path)


def blobs(n=300, seed=0):
    """Three well separated classes in 3 features of very different scales."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 3)) * 0.3 + y[:, None] * 2.0
    x *= [1.0, 100.0, 0.01]
    return x, np.array(SPECIES)[y]


def run(argv, capsys, command=main):
    code = command(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def table(tmp_path):
    x, labels = blobs()
    return write_csv(tmp_path / "train.csv", x, labels), x, labels


def test_csv_with_string_labels_trains_saves_evaluates_and_predicts(table, tmp_path, capsys):
    path, x, labels = table
    model_path = str(tmp_path / "m.fmlp")
    code, out, err = run(["--data", path, "--target", "species", "--epochs", "20", "--quiet",
                          "--save", model_path], capsys)
    assert code == 0, err
    assert "270 training rows, 3 features, target 'species' with 3 classes, 30 rows held out" in out
    assert "Settings for your data: --init xavier --optimizer adam --lr 0.01 --batch-size 32" in out
    held_accuracy = float(out.split("held-out accuracy: ")[1].split()[0])
    assert held_accuracy >= 0.95

    model = fastmlp.load(model_path)
    assert model.preprocessing["classes"] == SPECIES
    assert model.preprocessing["features"] == FEATURES
    kept = np.sort(np.random.default_rng(0).permutation(300)[30:])  # --seed 0's split
    assert np.allclose(model.preprocessing["mean"], x[kept].mean(axis=0))
    assert np.allclose(model.preprocessing["scale"], x[kept].std(axis=0))
    assert model.source["data"] == path and len(model.source["data_sha256"]) == 64

    # evaluate with no other flag: the recorded file, the same held-out rows
    code, out, err = run(["--evaluate", model_path], capsys)
    assert code == 0, err
    assert out.startswith(f"{model_path}: held-out loss ") and f"{held_accuracy:.4f}" in out

    # predictions come back as the original labels, columns found by name
    new = write_csv(tmp_path / "new.csv", x[:, ::-1][:20], None, names=FEATURES[::-1])
    output = tmp_path / "pred.csv"
    code, out, err = run([model_path, new, "--proba", "-o", str(output)], capsys,
                         predict_main)
    assert code == 0, err
    rows = list(csv.reader(open(output)))
    assert rows[0] == ["prediction", "p(setosa)", "p(versicolor)", "p(virginica)"]
    expected = model.predict(sources.scale(x[:20], model.preprocessing, model.dtype))
    assert [row[0] for row in rows[1:]] == [SPECIES[i] for i in expected]
    assert [row[0] for row in rows[1:]] == list(labels[:20])
    assert np.allclose([sum(map(float, row[1:])) for row in rows[1:]], 1.0, atol=1e-5)


def test_resume_continues_on_the_recorded_data_bit_for_bit(table, tmp_path, capsys):
    path = table[0]
    straight, half = str(tmp_path / "s.fmlp"), str(tmp_path / "h.fmlp")
    assert run(["--data", path, "--epochs", "4", "--quiet", "--save", straight], capsys)[0] == 0
    assert run(["--data", path, "--epochs", "2", "--quiet", "--save", half], capsys)[0] == 0
    code, out, err = run(["--resume", half, "--epochs", "4", "--quiet", "--save", half], capsys)
    assert code == 0, err
    assert np.array_equal(fastmlp.load(straight).params, fastmlp.load(half).params)


def test_a_changed_file_is_named_and_an_explicit_source_overrides(table, tmp_path, capsys):
    path, x, labels = table
    model_path = str(tmp_path / "m.fmlp")
    assert run(["--data", path, "--epochs", "1", "--quiet", "--save", model_path], capsys)[0] == 0
    with open(path, "a") as f:
        f.write("1,2,3,setosa\n")
    code, out, err = run(["--evaluate", model_path], capsys)
    assert code == 2 and f"trained on {path}, which has changed since" in err
    other = write_csv(tmp_path / "other.csv", x[:50], labels[:50])
    code, out, err = run(["--evaluate", model_path, "--data", other], capsys)
    assert code == 0, err
    assert out.startswith(f"Using --data {other}, not the data {model_path} was trained on")


@pytest.mark.parametrize("kind", ["npz", "npy", "parquet", "test-file"])
def test_other_file_kinds(kind, tmp_path, capsys):
    x, labels = blobs()
    codes = np.searchsorted(SPECIES, labels)
    argv = ["--epochs", "20", "--quiet"]
    if kind == "npz":
        np.savez(tmp_path / "d.npz", X=x, y=codes)
        argv += ["--data", str(tmp_path / "d.npz")]
    elif kind == "npy":
        np.save(tmp_path / "d.npy", np.column_stack([codes, x]))
        argv += ["--data", str(tmp_path / "d.npy"), "--target", "0"]
    elif kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        columns = {name: x[:, j] for j, name in enumerate(FEATURES)}
        pq.write_table(pa.table({**columns, "species": labels}), tmp_path / "d.parquet")
        argv += ["--data", str(tmp_path / "d.parquet")]  # target: the last column
    else:
        argv += ["--data", write_csv(tmp_path / "a.csv", x[:250], labels[:250]),
                 "--test", write_csv(tmp_path / "b.csv", x[250:], labels[250:])]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    accuracy = float(out.split("accuracy: ")[-1].split()[0])
    assert accuracy >= 0.95
    assert ("test file" in out) == (kind == "test-file")


def test_missing_cells_are_refused_unless_a_policy_is_chosen(tmp_path, capsys):
    x, labels = blobs(60)
    path = write_csv(tmp_path / "gaps.csv", x, labels)
    lines = open(path).read().splitlines()
    lines[5] = ",".join(["1.0", "", "0.5", "setosa"])  # row 5: the width is empty
    lines[9] = ",".join(["NaN", "3.0", "0.5", "virginica"])
    open(path, "w").write("\n".join(lines) + "\n")
    code, out, err = run(["--data", path, "--epochs", "1", "--quiet"], capsys)
    assert code == 2
    assert ("2 rows have missing or NaN features (the first is row 5, column 'width'; rows "
            "missing by column: 'length' 1, 'width' 1)") in err
    assert "--missing drop" in err and err.count("\n") == 1
    model_path = str(tmp_path / "m.safetensors")
    code, out, err = run(["--data", path, "--epochs", "1", "--quiet", "--missing", "drop",
                          "--save", model_path], capsys)
    assert code == 0 and "52 training rows" in out  # 58 rows, 6 held out
    code, out, err = run([model_path, path], capsys, predict_main)  # one answer a row
    assert code == 2 and ("(the first is row 5, column 'width'; rows missing by column: "
                          "'length' 1, 'width' 1); the model was trained with --missing drop, "
                          "so it needs every feature") in err
    code, out, err = run(["--data", path, "--epochs", "1", "--quiet", "--missing", "mean"], capsys)
    assert code == 0 and "54 training rows" in out


@pytest.mark.parametrize("content,argv,message", [
    ("a,b,species\n1,2,x\n3,oops,y\n", [], "bad.csv, line 3, column 'b': 'oops' is not a number"),
    ("a,b,species\n1,2,x\n3,4\n", [], "bad.csv, line 3: 2 cells, the header has 3"),
    ("a,b,species\n1,2,x\n3,4,y\n", ["--target", "label"],
     "bad.csv: no target column 'label'; the columns are a, b, species"),
    ("a,b,species\n1,2,x\n3,4,x\n", [], "the target has a single class ('x')"),
    ("a,b,price\n1,2,3.0\n3,4,2.5\n", [],
     "the target 'price' holds numbers that are not whole (2.5), not class labels; "
     "--output linear fits them as numbers"),
    ("a,a,species\n1,2,x\n", [], "column 'a' appears twice"),
    ("a,b,species\n1,2,x\n3,4,y\n", ["--output", "linear"],
     "the linear output needs numeric targets; the target holds 'x'\n"),
    ("a,b,tags\n1,2,1\n3,4,2\n", ["--target", "tags", "--output", "sigmoid"],
     "the sigmoid (multi-label) output needs 0/1 targets; the target holds 2.0\n"),
    ("", [], "bad.csv: the file is empty"),
    ("a,b,species\n", [], "no rows below the header"),
    # a column of text is categorical; one that mixes text and numbers is a mistake
    ("a,b,species\n1,x,p\n2,3,q\n", [], "bad.csv, line 2, column 'b': 'x' is not a number"),
    ("name,a,species\n" + "".join(f"p{i},{i},{i % 2}\n" for i in range(30)), [],
     "column 'name' (30 distinct values in 30 rows) holds text with too many distinct values "
     "to encode as categories (at most 100, and 2 rows a value on average); leave it out with "
     "--ignore name"),
    # every such column at once, not one a run
    ("name,a,day,species\n" + "".join(f"p{i},{i},d{i % 20},{i % 2}\n" for i in range(30)), [],
     "columns 'name' (30 distinct values in 30 rows), 'day' (20 distinct values in 30 rows) "
     "hold text with too many distinct values to encode as categories (at most 100, and 2 rows "
     "a value on average); leave them out with --ignore name,day"),
    ("a,b,species\n1,2,x\n3,4,y\n", ["--ignore", "b,c"],
     "bad.csv: no column 'c' to ignore; the columns are a, b, species"),
    ("a,b,species\n1,2,x\n3,4,y\n", ["--ignore", "a,b"],
     "bad.csv: no feature columns besides the target 'species'"),
])
def test_bad_files_exit_2_with_the_place_named(tmp_path, capsys, content, argv, message):
    (tmp_path / "bad.csv").write_text(content)
    code, out, err = run(["--data", str(tmp_path / "bad.csv"), "--quiet"] + argv, capsys)
    assert code == 2
    assert err.startswith("fastmlp-train: error: ") and err.count("\n") == 1
    assert message in err


def test_early_stopping_watches_the_training_loss_without_held_out_rows(table, capsys):
    path = table[0]
    common = ["--data", path, "--validation-split", "0", "--epochs", "300", "--patience", "1",
              "--min-delta", "0.01",
              "--quiet"]
    code, out, err = run(common, capsys)
    assert code == 0, err
    assert re.search(r"Early stopping after epoch \d+: no loss improvement for 1 epoch", out)
    code, out, err = run(common + ["--monitor", "val_accuracy"], capsys)
    assert code == 2 and err == (
        "fastmlp-train: error: --monitor val_accuracy watches held-out rows, and there are none: "
        "give --test FILE or --validation-split > 0, or --monitor accuracy\n")


def test_the_plateau_schedule_from_the_command_line(table, tmp_path, capsys):
    path, model_path = table[0], str(tmp_path / "m.safetensors")
    # the training accuracy of well separated blobs soon stops rising
    code, out, err = run(["--data", path, "--lr-schedule", "plateau", "--lr-patience", "1",
                          "--lr-factor", "0.5", "--lr-min", "0.002", "--monitor", "accuracy",
                          "--epochs", "60", "--quiet", "--save", model_path,
                          "--history", str(tmp_path / "h.json")], capsys)
    assert code == 0, err
    rates = [row["lr"] for row in json.loads((tmp_path / "h.json").read_text())]
    lowered = [f"{rates[i]:.4g} from epoch {i + 1}" for i in range(1, 60) if rates[i] != rates[i - 1]]
    assert rates[0] == 0.01 and lowered and min(rates) >= 0.002
    line = out.splitlines()[-2]
    assert line.startswith("Learning rate lowered on plateaus of accuracy (1 epoch without "
                           "improvement): " + ", ".join(lowered)), line
    schedule = fastmlp.load(model_path).optimizer_state.schedule
    assert (schedule.monitor, schedule.factor, schedule.min_lr) == ("accuracy", 0.5, 0.002)
    code, out, err = run(["--resume", model_path, "--epochs", "61", "--quiet"], capsys)
    assert code == 0, err  # the file's schedule, monitor and state go on


@pytest.mark.parametrize("argv,message", [
    (["--lr-schedule", "plateau", "--lr-factor", "1"], "--lr-factor must be < 1"),
    (["--lr-schedule", "plateau", "--lr-patience", "0"], "--lr-patience >= 1"),
    (["--monitor", "loss"], "--monitor says what --patience or --lr-schedule plateau watch"),
    (["--lr-schedule", "plateau", "--monitor", "r2"], "--monitor r2 is not a metric"),
    (["--lr-schedule", "plateau", "--monitor", "val_loss", "--validation-split", "0"],
     "--monitor val_loss watches held-out rows, and there are none"),
])
def test_plateau_usage_errors(table, capsys, argv, message):
    try:
        code, out, err = run(["--data", table[0], "--epochs", "1", "--quiet"] + argv, capsys)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and message in err, err


def test_predict_refuses_bad_input_and_writes_nothing(table, tmp_path, capsys):
    path = table[0]
    model_path = str(tmp_path / "m.fmlp")
    assert run(["--data", path, "--epochs", "1", "--quiet", "--save", model_path], capsys)[0] == 0
    (tmp_path / "new.csv").write_text("length,depth\n1,2\n")
    output = tmp_path / "out.csv"
    code, out, err = run([model_path, str(tmp_path / "new.csv"), "-o", str(output)], capsys,
                         predict_main)
    assert code == 2 and "no column 'width', which the model was trained on" in err
    assert sorted(os.listdir(tmp_path)) == ["m.fmlp", "new.csv", "train.csv"]


def test_predictions_are_written_in_the_format_of_the_files_ending(table, tmp_path, capsys):
    """-o FILE.json, .parquet, .xlsx, .tsv: the same table as the CSV, typed
    (as pandas reads each back); an unknown ending is a usage error."""
    path, x, labels = table
    model_path = str(tmp_path / "m.fmlp")
    assert run(["--data", path, "--epochs", "3", "--quiet", "--save", model_path], capsys)[0] == 0
    rows = ["id,length,width,depth,note"] + [
        f"{i},{a},{b},{c},{'' if i % 3 else 'odd'}" for i, (a, b, c) in enumerate(x[:12])]
    (tmp_path / "new.csv").write_text("\n".join(rows) + "\n")
    argv = [model_path, str(tmp_path / "new.csv"), "--keep", "id,note", "--proba", "-o"]
    code, out, err = run(argv + ["-"], capsys, predict_main)
    assert code == 0, err
    expected = pd.read_csv(io.StringIO(out))
    assert list(expected.columns) == ["id", "note", "prediction", "p(setosa)", "p(versicolor)",
                                      "p(virginica)"]
    assert list(expected["prediction"]) == list(labels[:12])
    readers = {"p.json": pd.read_json, "p.parquet": pd.read_parquet, "p.xlsx": pd.read_excel,
               "p.tsv": lambda f: pd.read_csv(f, sep="\t"), "p": pd.read_csv}
    for name, read in readers.items():
        assert run(argv + [str(tmp_path / name)], capsys, predict_main)[0] == 0
        written = read(tmp_path / name)
        assert list(written.columns) == list(expected.columns), name
        assert list(written["id"]) == list(range(12)) and written["id"].dtype.kind in "if"
        assert list(written["prediction"]) == list(labels[:12]), name
        assert written["note"].isna().sum() == 8 and (written["note"] == "odd").sum() == 4
        probabilities = written.iloc[:, 3:].to_numpy(float)
        assert np.allclose(probabilities, expected.iloc[:, 3:].to_numpy(float), rtol=1e-5)
        if name != "p.tsv":  # (written as text, to 6 digits)
            assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    code, out, err = run(argv + [str(tmp_path / "p.npy")], capsys, predict_main)
    assert code == 2 and "writes .csv, .tsv, .json, .parquet, .xlsx" in err
    assert not (tmp_path / "p.npy").exists()


def test_predict_reads_a_table_from_standard_input(table, tmp_path, capsys, monkeypatch):
    path, x, labels = table
    model_path = str(tmp_path / "m.fmlp")
    assert run(["--data", path, "--epochs", "3", "--quiet", "--save", model_path], capsys)[0] == 0
    from_file = run([model_path, path, "--proba"], capsys, predict_main)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(open(path, "rb").read())))
    assert run([model_path, "-", "--proba"], capsys, predict_main) == from_file
    assert from_file[0] == 0 and len(from_file[1].splitlines()) == 301
    # its errors name it "-"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"length,depth\n1,2\n")))
    code, out, err = run([model_path, "-"], capsys, predict_main)
    assert code == 2 and err.startswith("fastmlp-predict: error: -: no column 'width'"), err


def test_an_image_model_predicts_pixels_from_npy(tmp_path, capsys):
    model_path = str(tmp_path / "d.fmlp")
    assert run(["--dataset", "digits", "--epochs", "1", "--quiet", "--save", model_path],
               capsys)[0] == 0
    x_test = fastmlp.datasets.load("digits")[2]
    np.save(tmp_path / "images.npy", x_test[:7])
    code, out, err = run([model_path, str(tmp_path / "images.npy")], capsys, predict_main)
    assert code == 0 and err == "", err  # no compile notice: training compiled the kernels
    model = fastmlp.load(model_path)
    assert out.split() == ["prediction"] + [str(v) for v in model.predict(x_test[:7])]
    np.save(tmp_path / "scaled.npy", x_test[:7] / 255.0)
    code, out, err = run([model_path, str(tmp_path / "scaled.npy")], capsys, predict_main)
    assert code == 2 and "pixel values 0..255" in err


def test_digits_defaults_learn(capsys):
    code, out, err = run(["--dataset", "digits", "--quiet"], capsys)
    assert code == 0, err
    assert "Settings for digits: --init xavier --optimizer adam --lr 0.01 --batch-size 32" in out
    assert float(out.split("test accuracy: ")[1].split()[0]) >= 0.95
    assert "Trained 10 epochs in" in out and not err


def test_a_diverging_run_is_named(capsys):
    code, out, err = run(["--dataset", "digits", "--optimizer", "sgd", "--lr", "100",
                          "--epochs", "3", "--quiet"], capsys)
    assert code == 0
    assert "fastmlp-train: warning: the training loss after epoch" in err
    assert "Try a smaller learning rate than sgd --lr 100" in err


@pytest.mark.parametrize("argv,message", [
    (["--datas", "x.csv"], "unrecognized argument --datas; did you mean --data?"),
    (["--epoch", "3"], "unrecognized argument --epoch; did you mean --epochs?"),
    (["--hidden", "128,,64"], "--hidden takes comma-separated integers, got '128,,64'"),
    (["--test", "t.csv"], "--test goes with --data FILE"),
    (["--data", "x.csv", "--dataset", "digits"], "--data is your own file"),
    (["--data", "x.txt"], "x.txt: unknown file type '.txt'"),
    (["--plot", "curves.xyz"], "--plot curves.xyz: .xyz is not a format matplotlib writes; "
     "it writes ."),
])
def test_usage_errors_are_one_line(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_version_and_python_m_fastmlp():
    result = subprocess.run([sys.executable, "-m", "fastmlp", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"fastmlp-train {fastmlp.__version__}"


def test_compile_only_compiles_and_trains_nothing(capsys, tmp_path):
    code, out, err = run(["--compile-only"], capsys)
    assert code == 0 and out.endswith("s\n") and "Kernels ready for this CPU (float32)" in out
    assert "Epoch" not in out and not list(tmp_path.iterdir())


def test_one_epoch_is_singular(capsys):
    code, out, err = run(["--dataset", "digits", "--epochs", "1", "--quiet"], capsys)
    assert code == 0 and "Trained 1 epoch in" in out


def test_the_compile_notice_shows_only_when_compiling(capsys, tmp_path, monkeypatch):
    printer = ProgressPrinter()
    printer.on_compile_begin(False)
    printer.on_train_begin(1.0)
    printer.on_compile_begin(True)
    printer.on_train_begin(0.01)
    assert capsys.readouterr().out == f"{COMPILE_NOTICE}...\nJIT compile: 1.00s\nJIT compile: 0.01s\n"
    # where nothing can be cached, it says so (and not "first run only")
    monkeypatch.setattr(jit, "caching", lambda: False)
    printer.on_compile_begin(False)
    assert capsys.readouterr().out == f"{UNCACHED_NOTICE}...\n"
    # ready() tells a cached function from one that must compile, across processes
    (tmp_path / "cached_kernel.py").write_text(
        "import numba\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np\n"
              "from fastmlp.jit import ready; from cached_kernel import twice\n"
              "x = np.ones(3); print(ready(twice, (x,)), ready(twice, (np.ones(3, np.int8),)))\n"
              "twice(x)\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    answers = [subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=120).stdout.split()
               for _ in range(2)]
    assert answers == [["False", "False"], ["True", "False"]]


def test_tables_read_alike_from_every_format(tmp_path):
    x, labels = blobs(20)
    csv_table = tabular.read_table(write_csv(tmp_path / "t.csv", x, labels))
    assert csv_table.names == FEATURES and csv_table.target_name == "species"
    assert np.array_equal(csv_table.features, x) and list(csv_table.target) == list(labels)
    np.savez(tmp_path / "t.npz", X=x, y=np.arange(20))
    npz = tabular.read_table(tmp_path / "t.npz")
    assert np.array_equal(npz.features, x) and list(npz.target) == list(range(20))
    numbers = tabular.read_table(write_csv(tmp_path / "n.csv", x, [str(i % 4) for i in range(20)]))
    assert numbers.target.dtype.kind == "i"  # numeric labels stay numbers


def test_text_columns_are_one_hot_encoded(tmp_path):
    (tmp_path / "t.csv").write_text("size,color,shade,y\n1,red,dark,a\n2, blue,,b\n"
                                    "3,red,light,a\n")
    table = tabular.read_table(tmp_path / "t.csv", "y")
    assert table.names == ["size", "color", "shade"]
    assert table.categories == {"color": ["blue", "red"], "shade": ["dark", "light"]}
    nan = np.nan
    expected = [[1, 0, 1, 1, 0], [2, 1, 0, nan, nan], [3, 0, 1, 0, 1]]  # a missing cell: NaN
    np.testing.assert_array_equal(table.features, expected)
    assert table.column_name(0) == "'size'" and table.column_name(4) == "'shade'"
    # a model's categories: a value outside them is none of them, and said
    (tmp_path / "new.csv").write_text("shade,size,color\ndark,4,green\nlight,5,red\n"
                                      "dark,6,pink\n")
    new = tabular.read_table(tmp_path / "new.csv", need_target=False,
                             feature_names=table.names, categories=table.categories)
    np.testing.assert_array_equal(new.features, [[4, 0, 0, 1, 0], [5, 0, 1, 0, 1],
                                                 [6, 0, 0, 1, 0]])
    assert new.unseen == {"color": ["green", "pink"]}
    assert sources.unseen_note(new) == ("values unseen in training, encoded as none of the "
                                        "categories: color 'green', 'pink' (2 rows)")
    # given no categories, a column of text is an error, as for a model of numbers
    with pytest.raises(tabular.DataError, match="line 2, column 'color': 'green' is not a"):
        tabular.read_table(tmp_path / "new.csv", need_target=False,
                           feature_names=table.names, categories={})
    pytest.importorskip("pyarrow")
    import pandas as pd
    frame = pd.read_csv(tmp_path / "t.csv", skipinitialspace=True)
    frame["color"] = frame["color"].astype("category")  # a dictionary column in Parquet
    frame.to_parquet(tmp_path / "t.parquet")
    parquet = tabular.read_table(tmp_path / "t.parquet", "y")
    assert parquet.categories == table.categories
    np.testing.assert_array_equal(parquet.features, expected)
    # a column of dates is neither: refused, naming the way out
    frame["day"] = pd.date_range("2021-01-01", periods=len(frame))
    frame.to_parquet(tmp_path / "dates.parquet")
    with pytest.raises(tabular.DataError, match=r"column 'day' holds datetime64\[.s\], not "
                       r"numbers; leave it out with --ignore day, or make it numbers"):
        tabular.read_table(tmp_path / "dates.parquet", "y")


def passengers(n, seed, ports="CQS"):
    """A table whose class follows its two text columns: survived when sex
    is f or the port is C, whatever the age and fare; an id column too."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["f", "m"], n)
    port = rng.choice(list(ports), n)
    lines = ["id,age,sex,fare,port,survived"]
    for i in range(n):
        survived = "yes" if sex[i] == "f" or port[i] == "C" else "no"
        lines.append(f"x{seed}-{i},{rng.integers(1, 80)},{sex[i]},{rng.exponential(30):.2f},"
                     f"{port[i]},{survived}")
    return lines


def test_text_columns_from_the_command_line(tmp_path, capsys):
    lines = passengers(400, seed=0)
    lines[3] = lines[3].replace(",f,", ",,").replace(",m,", ",,")  # a missing sex
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    model_path = str(tmp_path / "m.safetensors")
    argv = ["--data", str(path), "--target", "survived", "--ignore", "id", "--missing", "mean",
            "--epochs", "30", "--quiet", "--save", model_path]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "4 features ('sex', 'port' one-hot encoded: 7 inputs)" in out
    assert float(out.split("held-out accuracy: ")[1].split()[0]) >= 0.95
    model = fastmlp.load(model_path)
    assert model.preprocessing["features"] == ["age", "sex", "fare", "port"]
    assert model.preprocessing["categories"] == {"sex": ["f", "m"], "port": ["C", "Q", "S"]}
    assert model.source["ignore"] == "id" and model.n_features == 7
    code, out, err = run(["--evaluate", model_path], capsys)
    assert code == 0 and "held-out accuracy" in out, err

    # new rows, one of them from a port never seen: predicted, and said on stderr
    new = passengers(60, seed=1, ports="CQSX")
    (tmp_path / "new.csv").write_text("\n".join(new) + "\n")
    code, out, err = run([model_path, str(tmp_path / "new.csv")], capsys, predict_main)
    assert code == 0
    assert err.startswith("fastmlp-predict: warning: ") and "port 'X' (" in err
    predicted = out.split()[1:]
    truth = [line.split(",")[-1] for line in new[1:]]
    known = [i for i, line in enumerate(new[1:]) if line.split(",")[4] != "X"]
    assert len(predicted) == 60 and all(predicted[i] == truth[i] for i in known)
    # other columns copied in front, as they are: an id, say
    code, out, err = run([model_path, str(tmp_path / "new.csv"), "--keep", "id,age"], capsys,
                         predict_main)
    assert code == 0
    assert out.splitlines() == ["id,age,prediction"] + [
        ",".join(line.split(",")[:2] + [label]) for line, label in zip(new[1:], predicted)]
    code, out, err = run([model_path, str(tmp_path / "new.csv"), "--keep", "name"], capsys,
                         predict_main)
    assert code == 2 and "no column 'name' to keep; the columns are id, age" in err
    # and as a test file, or the data a resumed model goes on with
    code, out, err = run(argv[:-2] + ["--epochs", "1", "--test", str(tmp_path / "new.csv")],
                         capsys)
    assert code == 0 and "values unseen in training, encoded as none of the categories: port 'X'" \
        in out, err
    code, out, err = run(["--resume", model_path, "--epochs", "31", "--quiet", "--data",
                          str(tmp_path / "new.csv"), "--target", "survived", "--ignore", "id"],
                         capsys)
    assert code == 0 and "54 training rows" in out and "encoded as none of the categories: " \
        "port 'X'" in out, err

    # model files with categories that do not fit their features are refused
    for change, message in ((lambda prep: prep["categories"].update(sex=["f"]),
                             "bad preprocessing features"),
                            (lambda prep: prep["categories"].update(id=["a"]),
                             "categories must map feature columns to distinct strings"),
                            (lambda prep: prep["categories"].update(sex=["f", "f"]),
                             "categories must map feature columns to distinct strings")):
        shutil.copy(model_path, tmp_path / "bad.safetensors")
        with_preprocessing(tmp_path / "bad.safetensors", change)
        with pytest.raises(ValueError, match=message):
            fastmlp.load(tmp_path / "bad.safetensors")


def test_delimiters_decimal_commas_compression_and_excel_read_alike(tmp_path):
    import bz2
    import gzip
    import lzma
    x, labels = blobs(30)
    x[4, 1] = np.nan
    lines = [f"{FEATURES[0]},{FEATURES[1]},{FEATURES[2]},species"] + [
        ",".join(["" if np.isnan(v) else repr(float(v)) for v in row] + [label])
        for row, label in zip(x, labels)]
    plain = "\n".join(lines) + "\n"
    indexed = "\n".join([","] + [f"{i},{line}" for i, line in enumerate(lines[1:])])
    files = {"t.csv": plain, "tabs.tsv": plain.replace(",", "\t"),
             "pandas index.csv": indexed.replace(",\n", "," + lines[0] + "\n", 1) + "\n",
             "tabs.csv": plain.replace(",", "\t"), "pipes.csv": plain.replace(",", "|"),
             "semicolons.csv": plain.replace(",", ";"),
             "decimal commas.csv": plain.replace(",", ";").replace(".", ",")}
    for name, opener in (("t.csv.gz", gzip.open), ("t.tsv.bz2", bz2.open),
                         ("t.csv.xz", lzma.open)):
        files[name] = files["tabs.tsv"] if ".tsv" in name else plain
        with opener(tmp_path / name, "wt") as f:
            f.write(files[name])
    for name, text in files.items():
        if not name.endswith(tuple(tabular.COMPRESSED)):
            (tmp_path / name).write_text(text)
        table = tabular.read_table(tmp_path / name)
        assert table.names == FEATURES and list(table.target) == list(labels), name
        np.testing.assert_array_equal(table.features, x, err_msg=name)
    pytest.importorskip("openpyxl")
    import pandas as pd
    frame = pd.read_csv(tmp_path / "t.csv")
    frame.to_excel(tmp_path / "t.xlsx")  # with pandas' unnamed row index first
    table = tabular.read_table(tmp_path / "t.xlsx")
    assert table.names == FEATURES and list(table.target) == list(labels)
    np.testing.assert_allclose(table.features, x, rtol=1e-14)  # 15 digits in the file
    (tmp_path / "bad.xlsx").write_bytes(b"not a workbook")
    with pytest.raises(tabular.DataError, match="bad.xlsx: cannot read Excel: "):
        tabular.read_table(tmp_path / "bad.xlsx")
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(tabular.DataError, match="bad.csv.gz: cannot read: "):
        tabular.read_table(tmp_path / "bad.csv.gz")
    with pytest.raises(tabular.DataError, match="unknown file type '.npy'; .* also compressed"):
        tabular.read_table(tmp_path / "t.npy.gz")
    # decimal commas mixed with a decimal point: neither numbers nor text
    (tmp_path / "mixed.csv").write_text("a;b;y\n1,5;x;0\n2.5;y;1\n")
    with pytest.raises(tabular.DataError, match="line 2, column 'a': '1,5' is not a number"):
        tabular.read_table(tmp_path / "mixed.csv")


def test_balanced_class_weights_lift_a_rare_class(tmp_path, capsys):
    from sklearn.utils.class_weight import compute_sample_weight

    from fastmlp.training import balanced_class_weights
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 4))
    rare = x[:, 0] + rng.normal(size=3000) > 2.2  # 6% of the rows, overlapping the rest
    labels = np.where(rare, "fraud", "ok")
    path = write_csv(tmp_path / "imbalanced.csv", x, labels, names="abcd", target="y")
    y = (labels == "ok").astype(np.int64)  # the classes' indices, sorted
    np.testing.assert_allclose(balanced_class_weights(y, 2)[y], compute_sample_weight("balanced", y))
    recall = {}
    for choice in ("none", "balanced"):
        model_path = str(tmp_path / f"{choice}.safetensors")
        code, out, err = run(["--data", path, "--epochs", "5", "--quiet", "--class-weight",
                              choice, "--save", model_path], capsys)
        assert code == 0, err
        assert ("Class weights (balanced): fraud 8.08, ok 0.533" in out) == (choice == "balanced")
        assert ("held-out balanced accuracy: " in out) == (choice == "balanced")
        assert fastmlp.load(model_path).source.get("class_weight") == (
            None if choice == "none" else choice)
        code, out, err = run([model_path, path], capsys, predict_main)
        recall[choice] = np.mean(np.array(out.split()[1:])[rare] == "fraud")
    assert recall["balanced"] > recall["none"] + 0.3, recall
    # resumed, the file's choice holds unless a flag changes it
    balanced = str(tmp_path / "balanced.safetensors")
    code, out, err = run(["--resume", balanced, "--epochs", "6", "--quiet"], capsys)
    assert code == 0 and "Class weights (balanced)" in out, err
    code, out, err = run(["--resume", balanced, "--epochs", "6", "--quiet", "--class-weight",
                          "none", "--save", balanced], capsys)
    assert code == 0 and "Class weights" not in out, err
    assert "class_weight" not in fastmlp.load(balanced).source
    with pytest.raises(SystemExit) as exc:
        main(["--data", path, "--target", "a", "--output", "linear", "--class-weight",
              "balanced"])
    assert exc.value.code == 2 and "it goes with --output softmax" in capsys.readouterr().err


# CSV files whose cells pyarrow and Python's int()/float() could read apart
TRICKY_CSVS = {
    "numbers": "a,b,y\n0.5,1,3\n-1e3,2,4\n2.25,-3,5\n",
    "float target": "a,b,y\n1,2,0.5\n3,4,1.5\n5,6,2\n",
    "whole floats": "a,b,y\n1.0,2,1.0\n3.0,4,2.0\n5.0,6,3.0\n",
    "exponents and signs": "a,b,y\n1e5,+3,.5\n-2.5E-3,5.,-.25\n",
    "missing cells": "a,b,y\n1,,3\nNA,2,4\n?,nan,5\n",
    "spaces": "a,b,y\n 1.5 ,2,3\n4,5 ,6\n",
    "underscores and other digits": "a,b,y\n1_000,\u0661\u0662,3\n4,5,6\n",
    "infinities": "a,b,y\ninf,-Infinity,0.5\n1,2,3\n",
    "NaN target": "a,b,y\n1,2,nan\n3,4,0.5\n",
    "string labels": "a,b,y\n1,2,cat\n3,4,dog\n",
    "booleans and dates": "a,b,y\n1,true,2020-01-01\n2,false,2020-01-02\n",
    "huge integers": "a,b,y\n1,2,99999999999999999999\n3,4,5\n",
    "blank lines and CRLF": "a,b,y\r\n1,2,3\r\n\r\n4,5,6\r\n",
    "byte order mark": "\ufeffa,b,y\n1,2,3\n4,5,6\n",
    "quotes": 'a,b,y\n"1",2,"x,y"\n3,4,"z"\n',
    "short row": "a,b,y\n1,2,3\n4,5\n",
    "header only": "a,b,y\n",
    "semicolons and decimal commas": "a;b;y\n1,5;2;3\n-,25;;4,5\n",
    "tabs": "a\tb\ty\n1\t2.5\t3\n4\t5\tcat\n",
    "a row index": ",a,b,y\n0,1,2.5,3\n1,4,5,cat\n",
    "two unnamed columns": ",,b,y\n0,1,2,3\n",
}


@pytest.mark.parametrize("name", TRICKY_CSVS)
def test_csv_reads_alike_with_and_without_pyarrow(name, tmp_path, monkeypatch):
    # read_csv_arrow parses numbers in C++; what it cannot match, it leaves
    # to the careful path, so every file reads to the same table or error
    path = tmp_path / "t.csv"
    path.write_bytes(TRICKY_CSVS[name].encode())
    monkeypatch.setattr(tabular, "ARROW_MIN_BYTES", 0)  # pyarrow for files of any size

    def read():
        try:
            table = tabular.read_table(path, "y")
        except tabular.DataError as exc:
            return str(exc)
        return table.names, table.features, table.target

    fast = read()
    monkeypatch.setattr(tabular, "read_csv_arrow", lambda path: None)
    careful = read()
    if isinstance(careful, str):
        assert fast == careful
        return
    assert fast[0] == careful[0]
    np.testing.assert_array_equal(fast[1], careful[1])  # NaN equals NaN here
    assert fast[2].dtype == careful[2].dtype and fast[2].tolist() == careful[2].tolist()


def test_small_files_skip_pyarrow_and_large_ones_take_it(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    x, _ = blobs(50)
    path = write_csv(tmp_path / "t.csv", x, [i % 3 for i in range(50)])
    calls = []
    arrow = tabular.read_csv_arrow
    monkeypatch.setattr(tabular, "read_csv_arrow", lambda path: calls.append(path) or arrow(path))
    small = tabular.read_table(path)
    assert calls == []
    monkeypatch.setattr(tabular, "ARROW_MIN_BYTES", os.path.getsize(path))
    large = tabular.read_table(path)
    assert calls == [path]
    np.testing.assert_array_equal(small.features, large.features)
    assert small.target.tolist() == large.target.tolist()


def test_csv_of_numbers_takes_pyarrow(tmp_path):
    pytest.importorskip("pyarrow")
    x, _ = blobs(50)
    path = write_csv(tmp_path / "t.csv", x, [i % 3 for i in range(50)])
    names, columns = tabular.read_csv_arrow(path)
    assert names == FEATURES + ["species"]
    assert [column.dtype for column in columns] == [np.float64] * 3 + [np.int64]
    np.testing.assert_array_equal(np.column_stack(columns[:3]), x)


def test_regression_and_multi_label_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    price = x[:, 0] * 3 + x[:, 1] + 0.1 * rng.normal(size=300)
    labels = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0], axis=1).astype(int)
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FEATURES + ["price", "red", "big"])
        writer.writerows([list(map(float, x[i])) + [float(price[i])] + list(labels[i])
                          for i in range(300)])
    model_path = str(tmp_path / "reg.safetensors")
    code, out, err = run(["--data", str(path), "--target", "price", "--output", "linear",
                          "--epochs", "30", "--quiet", "--save", model_path,
                          "--lr-schedule", "cosine", "--lr-min", "0.001"], capsys)
    assert code == 0, err
    assert "target 'price' numeric" in out and "dense_2 (linear)" in out
    r2 = float(out.split("held-out r2: ")[1].split()[0])
    assert r2 > 0.95
    model = fastmlp.load(model_path)
    assert model.output == "linear" and model.preprocessing["classes"] is None
    assert model.optimizer_state.schedule.to_json()["name"] == "cosine"
    code, out, err = run([model_path, str(path)], capsys, predict_main)
    assert code == 0, err
    predicted = np.array([float(v) for v in out.split()[1:]])
    assert out.split()[0] == "price" and len(predicted) == 300
    assert 1 - np.sum((predicted - price) ** 2) / np.sum((price - price.mean()) ** 2) > 0.95
    code, out, err = run(["--data", str(path), "--target", "red,big", "--output", "sigmoid",
                          "--epochs", "30", "--quiet", "--save", model_path], capsys)
    assert code == 0, err
    assert "2 labels, multi-label" in out
    assert float(out.split("held-out accuracy: ")[1].split()[0]) > 0.8
    code, out, err = run([model_path, str(path), "--proba"], capsys, predict_main)
    rows = [line.split(",") for line in out.split()]
    assert rows[0] == ["red", "big", "p(red)", "p(big)"] and len(rows) == 301
    assert np.mean([[int(v) for v in row[:2]] == list(labels[i])
                    for i, row in enumerate(rows[1:])]) > 0.8
    code, out, err = run(["--data", str(path), "--target", "species", "--output", "linear"],
                         capsys)
    assert code == 2 and "no target column 'species'" in err


def test_counts_with_the_poisson_output(tmp_path, capsys):
    # claims counted per policy: a Poisson mean exp(0.5 a - 0.3 b + 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    mean = np.exp(x @ [0.5, -0.3, 0.0] + 1.0)
    path = write_csv(tmp_path / "claims.csv", x, rng.poisson(mean), target="claims")
    model_path = str(tmp_path / "claims.safetensors")
    code, out, err = run(["--data", path, "--target", "claims", "--output", "poisson",
                          "--epochs", "10", "--quiet", "--save", model_path], capsys)
    assert code == 0, err
    assert "target 'claims' numeric," in out and "dense_2 (poisson)" in out  # not standardized
    code, out, err = run([model_path, path], capsys, predict_main)
    assert code == 0, err
    predicted = np.array([float(v) for v in out.split()[1:]])
    assert out.split()[0] == "claims" and predicted.min() > 0
    # the rates, in their units (Adam's last steps leave them some percent off)
    assert np.corrcoef(np.log(predicted), np.log(mean))[0, 1] > 0.95
    assert 0.7 < predicted.mean() / mean.mean() < 1.3
    bad = write_csv(tmp_path / "bad.csv", x, -rng.poisson(mean), target="claims")
    code, out, err = run(["--data", bad, "--target", "claims", "--output", "poisson"], capsys)
    assert code == 2 and "poisson output needs counts or rates >= 0" in err
    assert re.search(r"the target holds -\d+\.0$", err.rstrip())  # a number, not NumPy's repr


def houses(tmp_path, n=300):
    """(path, x, price) of a CSV whose target is around a million."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3))
    price = 1e6 + 1e5 * (x[:, 0] * 3 + x[:, 1]) + 1e3 * rng.normal(size=n)
    return write_csv(tmp_path / "houses.csv", x, price, target="price"), x, price


def train_houses(tmp_path, capsys, *argv):
    """fastmlp-train on houses(): (exit code, stdout, stderr, path, x, price)."""
    path, x, price = houses(tmp_path)
    code, out, err = run(["--data", path, "--target", "price", "--output", "linear",
                          "--quiet", *argv], capsys)
    return code, out, err, path, x, price


def r2(predicted, y):
    return 1 - np.sum((predicted - y) ** 2) / np.sum((y - y.mean()) ** 2)


def test_regression_targets_of_any_scale_are_standardized(tmp_path, capsys):
    # Prices around a million, trained on as they are, are far from what
    # the initial weights and learning rate suit: held-out R² -13.8 after 20
    # epochs. Standardized like the features, they fit, and fastmlp-predict
    # answers in the target's units.
    model_path = str(tmp_path / "houses.safetensors")
    code, out, err, path, x, price = train_houses(tmp_path, capsys, "--epochs", "20",
                                                  "--save", model_path)
    assert code == 0, err
    assert "target 'price' numeric, standardized" in out
    held_out = out.split("Held-out loss: ")[1].split()[0], out.split("held-out r2: ")[1].split()[0]
    out_train = out
    assert float(held_out[1]) > 0.95
    model = fastmlp.load(model_path)
    _, kept, _, _ = sources.split(x, price, 0.1, 0)  # the training rows
    assert np.allclose(model.preprocessing["target_mean"], [kept.mean()])
    assert np.allclose(model.preprocessing["target_scale"], [kept.std()])
    code, out, err = run([model_path, path], capsys, predict_main)
    assert code == 0, err
    predicted = np.array([float(v) for v in out.split()[1:]])
    assert r2(predicted, price) > 0.95
    # the model itself predicts standardized targets; target_values maps them back
    raw = model.predict(sources.scale(x, model.preprocessing, model.dtype))
    assert abs(np.mean(raw)) < 0.5
    in_units = sources.target_values(raw.reshape(-1, 1), model.preprocessing)[:, 0]
    np.testing.assert_allclose(in_units, predicted, rtol=1e-8)
    # the held-out rows' error in the target's units
    _, _, held_rows, held_price = sources.split(np.arange(300)[:, None], price, 0.1, 0)
    held_predicted = predicted[held_rows[:, 0]]
    rmse = float(out_train.split("held-out RMSE: price ")[1].split()[0])
    assert rmse == pytest.approx(np.sqrt(np.mean((held_predicted - held_price) ** 2)), rel=1e-5)
    code, out, err = run(["--evaluate", model_path], capsys)
    assert code == 0, err
    assert (f"held-out loss {held_out[0]} - held-out r2 {held_out[1]} - held-out RMSE price "
            f"{out_train.split('held-out RMSE: price ')[1].split()[0]} (30 held-out rows" in out)


def test_a_regression_that_learns_nothing_is_named(tmp_path, capsys):
    # on standardized targets, a loss above 1 is worse than predicting the mean
    code, out, err, *_ = train_houses(tmp_path, capsys, "--lr", "30", "--epochs", "5")
    assert code == 0, err
    assert ("is above the loss of predicting the mean, 1 on standardized targets: training is "
            "not converging. Try a smaller learning rate than adam --lr 30." in err)


def with_preprocessing(path, change):
    """The model file at path, its preprocessing changed by change(dict)."""
    import json

    from test_modelfile import resigned, tensors_and_metadata
    with open(path, "rb") as f:
        arrays, metadata = tensors_and_metadata(f.read())
    prep = json.loads(metadata["preprocessing"])
    change(prep)
    metadata["preprocessing"] = json.dumps(prep)
    with open(path, "wb") as f:
        f.write(resigned(arrays, metadata))


def test_target_scaling_in_model_files(tmp_path, capsys):
    model_path = str(tmp_path / "houses.safetensors")
    code, out, err, path, x, price = train_houses(tmp_path, capsys, "--epochs", "2",
                                                  "--save", model_path)
    assert code == 0, err
    # a file written before target scaling has no such entries: its outputs
    # are the targets as they were trained on
    with_preprocessing(model_path, lambda prep: [prep.pop(k) for k in ("target_mean",
                                                                       "target_scale")])
    model = fastmlp.load(model_path)
    assert model.preprocessing["target_mean"] is None
    code, out, err = run([model_path, path], capsys, predict_main)
    assert code == 0, err
    raw = model.predict(sources.scale(x, model.preprocessing, model.dtype))
    np.testing.assert_allclose([float(v) for v in out.split()[1:]], raw, rtol=1e-8)
    for key, value, message in (("target_scale", [0.0], "target_scale must be > 0"),
                                ("target_mean", [1.0, 2.0], "target_mean must hold 1 finite"),
                                ("target_scale", None, "target_scale must hold 1 finite")):
        with_preprocessing(model_path, lambda prep: prep.update(target_mean=[1.0],
                                                                target_scale=[1.0]))
        with_preprocessing(model_path, lambda prep: prep.update({key: value}))
        with pytest.raises(ValueError, match=message):
            fastmlp.load(model_path)


def test_output_and_schedule_flags_are_checked(capsys):
    for argv, message in ((["--output", "linear"], "--output linear needs your own"),
                          (["--lr-schedule", "step", "--lr-step-every", "0"], "--lr-step-every")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_predict_says_on_stderr_when_it_compiles(tmp_path, capsys, monkeypatch):
    model = fastmlp.MLP([3, 4, 2], seed=0)
    model.save(tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    argv = [str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy")]
    monkeypatch.setattr(fastmlp.MLP, "prediction_ready", lambda self: False)
    code, out, err = run(argv, capsys, predict_main)
    assert code == 0 and err == f"{PREDICT_COMPILE_NOTICE}...\n"
    monkeypatch.undo()
    expected = model.predict(np.zeros((2, 3), np.float32))
    assert out.split() == ["prediction"] + [str(v) for v in expected]
    assert model.prediction_ready()  # compiled by the call above
    assert run(argv, capsys, predict_main)[1:] == (out, "")
    # a process with an empty cache would compile (asked without compiling)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    proc = subprocess.run([sys.executable, "-c", "import fastmlp\n"
                           "print(fastmlp.MLP([3, 2, 2]).prediction_ready())"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["False"], proc.stderr


def test_npz_targets_of_several_columns(tmp_path, capsys):
    """y of an .npz may be a column (n, 1), one-hot rows for the softmax
    output, or several outputs for the linear and sigmoid ones."""
    x, labels = blobs(200)
    codes = np.searchsorted(SPECIES, labels)
    one_hot = np.eye(3, dtype=np.uint8)[codes]
    results = {}
    for name, y in [("labels", codes), ("column", codes[:, None]), ("one-hot", one_hot)]:
        path, model_path = tmp_path / f"{name}.npz", str(tmp_path / f"{name}.safetensors")
        np.savez(path, X=x, y=y)
        code, out, err = run(["--data", str(path), "--epochs", "3", "--quiet", "--save",
                              model_path], capsys)
        assert code == 0, err
        assert "with 3 classes" in out
        results[name] = fastmlp.load(model_path).params
        code, out, err = run([model_path, str(path)], capsys, predict_main)
        assert code == 0 and out.split()[0] == "prediction" and set(out.split()[1:]) <= {"0", "1", "2"}
    assert np.array_equal(results["labels"], results["column"])
    assert np.array_equal(results["labels"], results["one-hot"])
    soft = one_hot.astype(float)
    soft[7] = [0.5, 0.5, 0]
    np.savez(tmp_path / "soft.npz", X=x, y=soft)
    code, out, err = run(["--data", str(tmp_path / "soft.npz"), "--quiet"], capsys)
    assert code == 2 and "one-hot rows only" in err and "row 8 holds [0.5, 0.5, 0.0]" in err
    for output, y in [("sigmoid", one_hot), ("linear", x[:, :2] * 2)]:
        model_path = str(tmp_path / f"{output}.safetensors")
        np.savez(tmp_path / "multi.npz", X=x, y=y)
        code, out, err = run(["--data", str(tmp_path / "multi.npz"), "--output", output,
                              "--epochs", "3", "--quiet", "--save", model_path], capsys)
        assert code == 0, err
        assert fastmlp.load(model_path).n_outputs == y.shape[1]
        code, out, err = run([model_path, str(tmp_path / "multi.npz")], capsys, predict_main)
        assert code == 0, err
        assert out.split()[0] == ",".join(f"y{k}" for k in range(y.shape[1]))
    np.savez(tmp_path / "bad.npz", X=x, y=np.zeros((200, 2, 2)))
    code, out, err = run(["--data", str(tmp_path / "bad.npz"), "--output", "linear"], capsys)
    assert code == 2 and "y must have a row per row of X, shape (200,) or (200, outputs)" in err


def test_one_hot_target_columns_of_a_table_are_classes(table, tmp_path, capsys):
    path, x, labels = table
    one_hot = tmp_path / "one_hot.csv"
    with open(one_hot, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FEATURES + SPECIES)
        writer.writerows([[repr(float(v)) for v in row] + [int(label == s) for s in SPECIES]
                          for row, label in zip(x, labels)])
    saved = {}
    for data, target in [(path, "species"), (str(one_hot), ",".join(SPECIES))]:
        saved[target] = str(tmp_path / f"{len(target)}.safetensors")
        code, out, err = run(["--data", data, "--target", target, "--epochs", "2", "--quiet",
                              "--save", saved[target]], capsys)
        assert code == 0, err
    a, b = (fastmlp.load(p) for p in saved.values())
    assert a.preprocessing["classes"] == b.preprocessing["classes"] == SPECIES
    assert np.array_equal(a.params, b.params)


def test_predict_refuses_probabilities_of_values(tmp_path, capsys):
    model_path = str(tmp_path / "reg.safetensors")
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.savez(tmp_path / "r.npz", X=x, y=x[:, 0])
    assert run(["--data", str(tmp_path / "r.npz"), "--output", "linear", "--epochs", "1",
                "--quiet", "--save", model_path], capsys)[0] == 0
    code, out, err = run([model_path, str(tmp_path / "r.npz"), "--proba"], capsys, predict_main)
    assert code == 2 and out == ""
    assert err == f"fastmlp-predict: error: --proba: {model_path} predicts values (--output " \
        "linear), not probabilities\n"


def test_a_quantity_is_not_taken_for_classes_unless_asked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    price = np.round(200_000 + 50_000 * x[:, 0], -2).astype(int)
    path = str(tmp_path / "houses.csv")
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([FEATURES + ["price"]] + [list(x[i]) + [price[i]]
                                                         for i in range(200)])
    classes = len(np.unique(price))
    code, out, err = run(["--data", path, "--epochs", "1", "--quiet"], capsys)
    assert code == 2
    assert err == (f"fastmlp-train: error: {path}: the target 'price' holds {classes} different "
                   f"numbers in 200 rows, more like a quantity than classes: --output "
                   f"linear fits it as numbers, --output softmax trains {classes} classes "
                   "anyway\n")
    for output in ("softmax", "linear"):
        code, out, err = run(["--data", path, "--epochs", "1", "--quiet", "--output", output],
                             capsys)
        assert code == 0, err
    # under 5 rows a class is a quantity; more, classes as before
    x, labels = blobs(120)
    ids = np.searchsorted(SPECIES, labels) * 10 + rng.integers(0, 10, 120)  # 30 classes
    assert run(["--data", write_csv(tmp_path / "ids.csv", x, ids), "--epochs", "1", "--quiet"],
               capsys)[0] == 2
    x, labels = blobs(300)
    ids = np.searchsorted(SPECIES, labels) * 10 + rng.integers(0, 7, 300)  # 21 classes, 300 rows
    code, out, err = run(["--data", write_csv(tmp_path / "ids.csv", x, ids), "--epochs", "1",
                          "--quiet"], capsys)
    assert code == 0, err
