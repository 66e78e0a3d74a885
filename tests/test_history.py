"""History, as fit returns it: its rows, its file and its curves."""
import csv
import json

import numpy as np
import pytest

import fastmlp


@pytest.fixture(scope="module")
def fitted():
    """Histories of a classifier with validation data and a regression without."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    labels = (X[:, 0] > 0).astype(np.int32)
    classifier = fastmlp.MLP([4, 8, 2], activation="relu", init="he", seed=0)
    classes = fastmlp.fit(classifier, X, labels, epochs=3, batch_size=20, optimizer="adam",
                          lr=0.01, validation_data=(X[:50], labels[:50]), seed=0)
    regression = fastmlp.MLP([4, 8, 1], output="linear", seed=0)
    values = fastmlp.fit(regression, X, X[:, 1] * 2, epochs=2, batch_size=20, seed=0)
    return classes, values


def test_rows_are_the_epochs_in_order(fitted):
    classes, _ = fitted
    rows = classes.rows()
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "lr", "val_loss", "val_accuracy",
                             "epoch_time"]
    for key, values in classes.history.items():
        assert [row[key] for row in rows] == values


@pytest.mark.parametrize("ending", [".csv", ".json", ".CSV"])
def test_save_writes_every_metric_of_every_epoch(fitted, tmp_path, ending):
    classes, _ = fitted
    path = tmp_path / f"history{ending}"
    classes.save(path)
    if ending == ".json":
        rows = json.loads(path.read_text())
    else:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert rows == classes.rows()  # floats survive both files exactly


def test_save_refuses_other_endings(fitted, tmp_path):
    with pytest.raises(ValueError, match=r"history.txt: a history is saved as .csv or .json"):
        fitted[0].save(tmp_path / "history.txt")
    assert not (tmp_path / "history.txt").exists()


def test_plot_draws_the_metric_and_the_loss(fitted, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    classes, values = fitted
    figure = classes.plot()
    accuracy, loss = figure.axes
    assert (accuracy.get_title(), loss.get_title()) == ("Accuracy", "Loss")
    train, held_out = accuracy.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3]
    assert list(train.get_ydata()) == classes.history["accuracy"]
    assert list(held_out.get_ydata()) == classes.history["val_accuracy"]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train", "validation"]
    assert list(loss.get_lines()[1].get_ydata()) == classes.history["val_loss"]
    figure = values.plot(tmp_path / "curves.png")  # no validation data: one line each
    assert figure.axes[0].get_title() == "R²" and len(figure.axes[0].get_lines()) == 1
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_plain_floats(fitted):
    for history in fitted:
        for key, values in history.history.items():
            assert all(type(value) is float for value in values), key
