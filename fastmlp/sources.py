"""Where a command's data come from: a named dataset or the user's own files.

A model file records its source (`MLP.source`) and, for the user's files,
how raw rows become the model's input (`MLP.preprocessing`: the classes in
order, the feature columns, the categories of their text columns and the
scaling of the inputs) and, for a linear head, how
its outputs become the target's values (`target_mean`, `target_scale`), so
that `--evaluate MODEL`, `--resume MODEL` and `fastmlp-predict` need
nothing else.
"""
import os

import numpy as np

from . import datasets, tabular


class Data:
    """The arrays of one run and what they are. x_test is None when nothing
    is held out."""

    def __init__(self, x_train, y_train, x_test, y_test, source, description,
                 preprocessing=None, name=None, held_out="test"):
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.source, self.description, self.preprocessing = source, description, preprocessing
        self.name = name or description  # short, for messages
        self.held_out = held_out  # what x_test is: "test" or "held-out"


def dataset_source(name, data_dir=None):
    return {"dataset": name, "data_dir": os.path.abspath(data_dir) if data_dir else None}


def files_source(data, target=None, test=None, validation_split=0.1, seed=0, missing="error",
                 ignore=None):
    """The source for the user's files; checksums are added as they are read.
    target: one column, or several comma separated (multi-output); ignore:
    columns that are no features, comma separated."""
    return {"data": os.path.abspath(data), "target": target,
            "test": os.path.abspath(test) if test else None,
            "validation_split": None if test else validation_split, "seed": seed,
            "missing": missing, "ignore": ignore}


def load(source, preprocessing=None, download=True, check_files=False, dtype="float32",
         output="softmax"):
    """The Data of a source. preprocessing: a model's (classes, columns and
    scaling are then taken from it, not learnt). check_files: the source was
    recorded in a model, so its files must still have the recorded checksums.
    dtype: the model's, which standardized features are given in. output:
    the model's head: softmax encodes labels as classes, linear and sigmoid
    take numeric (0/1) targets."""
    if "dataset" in source:
        name = source["dataset"]
        arrays = datasets.load(name, data_dir=source.get("data_dir"), download=download)
        return Data(*arrays, source=source, description=f"dataset {name}", name=name)
    return load_files(dict(source), preprocessing, check_files, np.dtype(dtype), output)


def targets_of(table, output, classes):
    """(y, classes) of a table for the head: class indices and the classes
    in order (softmax), else numeric targets and the target columns' names."""
    if output == "softmax":
        labels = table.target
        if labels.ndim > 1:  # one-hot: a column per class, named (a table) or numbered (.npz)
            names = table.target_name.split(",") if table.names else range(labels.shape[1])
            labels = tabular.one_hot_classes(table.path, labels, list(names))
        elif classes is None and labels.dtype.kind == "f":  # scikit-learn's "continuous"
            fractional = labels[labels != np.round(labels)]
            if len(fractional):
                raise tabular.DataError(
                    f"{table.path}: the target {table.target_name!r} holds numbers that are "
                    f"not whole ({fractional[0].item()!r}), not class labels; --output "
                    "linear fits them as numbers")
        return tabular.encode_labels(table.path, labels, classes)
    y = tabular.numeric_targets(table.path, table.target, output)
    return y, (table.target_name.split(",") if output == "sigmoid" else None)


def load_files(source, preprocessing, check_files, dtype, output):
    paths = [("data", source["data"])] + ([("test", source["test"])] if source["test"] else [])
    for key, path in paths:
        digest = tabular.file_sha256(path) if os.path.exists(path) else None
        recorded = source.get(f"{key}_sha256")
        if check_files and recorded and digest != recorded:
            what = "is gone" if digest is None else "has changed since"
            raise tabular.DataError(f"the model was trained on {path}, which {what}; pass "
                                    f"--data (and --test) to use other files")
        source[f"{key}_sha256"] = digest
    names = preprocessing["features"] if preprocessing else None
    categories = (preprocessing.get("categories") or {}) if preprocessing else None
    target = source["target"] or (preprocessing["target"] if preprocessing else None)
    train = tabular.read_table(source["data"], target, feature_names=names,
                               categories=categories, ignore=source.get("ignore"))
    if train.target is None:
        raise tabular.DataError(f"{source['data']}: no target column {target!r}")
    source["target"] = train.target_name
    missing = preprocessing["missing"] if preprocessing else source["missing"]
    tabular.handle_missing(train, missing)
    y_all, classes = targets_of(train, output, preprocessing["classes"] if preprocessing else None)
    if source["test"]:
        test = tabular.read_table(source["test"], train.target_name,
                                  feature_names=train.names, categories=train.categories)
        if test.target is None:
            raise tabular.DataError(f"{test.path}: no target column {train.target_name!r}")
        tabular.handle_missing(test, missing)
        x_train, y_train, x_test = train.features, y_all, test.features
        y_test = targets_of(test, output, classes)[0]
        unseen = "; " + unseen_note(test) if test.unseen else ""
        held = f", test file {source['test']} ({len(y_test)} rows{unseen})"
    else:
        x_train, y_train, x_test, y_test = split(train.features, y_all,
                                                 source["validation_split"], source["seed"])
        held = (f", {len(y_test)} rows held out (--validation-split "
                f"{source['validation_split']:g})" if x_test is not None else "")
    if preprocessing is None:  # the scaling is learnt from the training rows alone
        mean, spread = tabular.learn_scaling(x_train)
        preprocessing = {"features": train.names, "target": train.target_name,
                         "missing": missing, "mean": mean.tolist(), "scale": spread.tolist(),
                         "classes": classes, **target_scaling(y_train, output)}
        if train.categories:
            preprocessing["categories"] = train.categories
    mean = np.array(preprocessing["mean"])
    for x in (x_train, x_test):
        if x is not None:
            tabular.fill_missing(x, mean)
    y_train, y_test = (standardized_targets(y, preprocessing) for y in (y_train, y_test))
    kind = (f"with {len(classes)} classes" if output == "softmax" else
            f"{len(classes)} labels, multi-label" if output == "sigmoid" else
            "numeric, standardized" if preprocessing.get("target_mean") else "numeric")
    encoded = ""
    if train.categories:
        encoded = (f" ({', '.join(map(repr, train.categories))} one-hot encoded: "
                   f"{x_train.shape[1]} inputs)")
    columns = len(train.names) if train.names else x_train.shape[1]
    unseen = "; " + unseen_note(train) if train.unseen else ""  # (a resumed model's data)
    description = (f"{source['data']} ({len(y_train)} training rows, {columns} "
                   f"features{encoded}, target {train.target_name!r} {kind}{held}{unseen})")
    return Data(scale(x_train, preprocessing, dtype), y_train,
                None if x_test is None else scale(x_test, preprocessing, dtype), y_test,
                source, description, preprocessing, name=source["data"],
                held_out="test" if source["test"] else "held-out")


def unseen_note(table):
    """"values unseen in training, encoded as none of the categories:
    port 'X', 'Y' (3 rows), ..." for a message, or "". """
    if not table.unseen:
        return ""

    def column(name, others):
        values = sorted(set(others))
        shown = ", ".join(map(repr, values[:3])) + (", ..." if len(values) > 3 else "")
        return f"{name} {shown} ({len(others)} row{'s' if len(others) > 1 else ''})"

    return ("values unseen in training, encoded as none of the categories: "
            + ", ".join(column(name, others) for name, others in table.unseen.items()))


def target_scaling(y, output):
    """The preprocessing entries of a head's targets. A linear head's
    targets are standardized like the features, with the training rows'
    mean and standard deviation per column (1 for a constant one), so that
    the learning rate and the initial weights suit any target's units, and
    a loss of 1 is that of predicting the mean."""
    if output != "linear":
        return {"target_mean": None, "target_scale": None}
    mean, spread = tabular.learn_scaling(y.reshape(len(y), -1))
    return {"target_mean": mean.tolist(), "target_scale": spread.tolist()}


def standardized_targets(y, preprocessing):
    """y as the model trains on it: standardized as preprocessing says, if
    it says so (models saved before target scaling did not)."""
    if y is None or not preprocessing.get("target_mean"):
        return y
    mean = np.array(preprocessing["target_mean"])
    spread = np.array(preprocessing["target_scale"])
    return ((y.reshape(len(y), -1) - mean) / spread).reshape(y.shape)


def output_scaling(model):
    """(target_mean, target_scale) that turn a linear model's outputs into
    its targets' units, when it was trained on standardized targets; None
    for other models."""
    prep = model.preprocessing
    if model.output != "linear" or not prep or not prep.get("target_mean"):
        return None
    return prep["target_mean"], prep["target_scale"]


def target_values(outputs, preprocessing):
    """A linear model's outputs (n, K) in the target's units: the inverse of
    standardized_targets."""
    if not preprocessing or not preprocessing.get("target_mean"):
        return outputs
    mean = np.array(preprocessing["target_mean"])
    return outputs * np.array(preprocessing["target_scale"]) + mean


def split(x, y, fraction, seed):
    """(x_train, y_train, x_held, y_held): a seeded random `fraction` of the
    rows held out (none for fraction 0)."""
    n_held = int(round(len(y) * fraction)) if fraction else 0
    if n_held == 0:
        return x, y, None, None
    if n_held >= len(y):
        raise tabular.DataError(f"--validation-split {fraction:g} leaves no training rows "
                                f"of {len(y)}")
    order = np.random.default_rng(seed).permutation(len(y))
    held, kept = np.sort(order[:n_held]), np.sort(order[n_held:])
    return x[kept], y[kept], x[held], y[held]


def scale(features, preprocessing, dtype):
    """The model's input: features standardized as preprocessing says."""
    mean = np.array(preprocessing["mean"])
    spread = np.array(preprocessing["scale"])
    return ((features - mean) / spread).astype(dtype)


def model_input(path, model, keep=None):
    """(the model's input, the table read) from a file to predict on: raw
    columns scaled as the model's preprocessing says; for a model trained on
    an image dataset, 8-bit pixel values. keep: columns, comma separated,
    the table also holds as they are (tabular.read_table)."""
    preprocessing = model.preprocessing
    if preprocessing is None:
        table = tabular.read_table(path, need_target=False, n_features=model.n_features,
                                   keep=keep)
        x = table.features
        if x.shape[1] != model.n_features:
            raise tabular.DataError(f"{path}: {x.shape[1]} columns, the model takes "
                                    f"{model.n_features} features")
        if model.source is not None and "dataset" in model.source:
            if np.isnan(x).any() or (x < 0).any() or (x > 255).any() or (x != np.round(x)).any():
                raise tabular.DataError(f"{path}: the model was trained on "
                                        f"{model.source['dataset']}, whose features are pixel "
                                        "values 0..255; this file holds other values")
            x = x.astype(np.uint8)
        return x, table
    table = tabular.read_table(path, preprocessing["target"], need_target=False,
                               feature_names=preprocessing["features"],
                               n_features=model.n_features,
                               categories=preprocessing.get("categories") or {}, keep=keep)
    if preprocessing["missing"] != "mean":  # one prediction per row: no row can go
        tabular.handle_missing(table, "error", f"the model was trained with --missing "
                               f"{preprocessing['missing']}, so it needs every feature (a "
                               "model trained with --missing mean fills them in)")
    tabular.fill_missing(table.features, np.array(preprocessing["mean"]))
    return scale(table.features, preprocessing, model.dtype), table


def describe(source):
    """A short name for a recorded source, for messages."""
    if source is None:
        return "nothing recorded"
    if "dataset" in source:
        return f"--dataset {source['dataset']}"
    return f"--data {source['data']}"
