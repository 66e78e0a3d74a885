"""fastmlp-predict: a saved model's predictions for the rows of a file."""
import argparse
import csv
import io
import sys

import numpy as np

from . import __version__, sources
from .cli import Parser
from .heads import VALUE_HEADS
from .files import atomic_write
from .modelfile import load as load_model
from .progress import PREDICT_COMPILE_NOTICE

EXAMPLES = """examples:
  fastmlp-predict model.safetensors new.csv       one predicted label per row, to stdout
  fastmlp-predict model.safetensors new.csv --proba -o out.csv
                                                  and each class's probability, to a file
  fastmlp-predict model.safetensors new.csv --keep id
                                                  each row's id, then its prediction
  fastmlp-predict digits.safetensors images.npy   8-bit pixels, one image per row

The file's columns are found by the names the model was trained on (other
columns, the target among them, are ignored) and encoded and scaled as in
training (a text value not seen in training is none of the categories);
predicted values (--output linear) are in the target's own units.
exit codes: 0 success, 2 usage error or bad input
"""


def build_parser():
    parser = Parser(prog="fastmlp-predict", description="Predict with a model saved by "
                    "fastmlp-train --save: one line per row of DATA, in order, as CSV: the "
                    "class label, the predicted values (--output linear) or one 0/1 column "
                    "per label (--output sigmoid).",
                    epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("model", metavar="MODEL", help="a model file")
    parser.add_argument("data", metavar="DATA", help="rows to predict: a table as "
                        "fastmlp-train --data reads (.csv, .tsv, compressed too, .parquet, .xlsx), .npz "
                        "(array X) or .npy")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the CSV here, "
                        "atomically (default: standard output)")
    parser.add_argument("--proba", action="store_true",
                        help="add one column per class (or label) with its probability")
    parser.add_argument("--keep", metavar="COLUMNS", help="columns of DATA to copy into the "
                        "output first, as they are (an id, say), comma separated")
    return parser


def predictions_csv(model, x, proba, kept=None):
    """The CSV text. softmax: a 'prediction' column of labels, then with
    proba one column per class; linear: one column per target; sigmoid: a
    0/1 column per label, then with proba one probability column each.
    kept: {name: cells} of the data's columns to write first, as they are."""
    header, rows = prediction_rows(model, x, proba)
    kept = kept or {}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(kept) + header)
    columns = [[cell_text(cell) for cell in cells] for cells in kept.values()]
    writer.writerows([[column[i] for column in columns] + row for i, row in enumerate(rows)])
    return text.getvalue()


def prediction_rows(model, x, proba):
    """(header, rows) of predictions_csv, as text."""
    prep = model.preprocessing
    if model.output in VALUE_HEADS:
        names = prep["target"].split(",") if prep else [f"y{k}" for k in range(model.n_outputs)]
        values = sources.target_values(model.predict(x).reshape(len(x), -1), prep)
        return names, [[f"{v:.9g}" for v in row] for row in values]
    probabilities = model.predict_proba(x)
    classes = prep["classes"] if prep is not None else list(range(model.n_outputs))
    chances = ([f"p({label})" for label in classes] if proba else [])
    if model.output == "sigmoid":
        return [str(label) for label in classes] + chances, [
            [str(int(p >= 0.5)) for p in row] + ([f"{p:.6g}" for p in row] if proba else [])
            for row in probabilities]
    labels = np.argmax(probabilities, axis=1)
    return ["prediction"] + chances, [
        [str(classes[label])] + ([f"{p:.6g}" for p in row] if proba else [])
        for label, row in zip(labels, probabilities)]


def cell_text(cell):
    """A kept cell as the file would hold it: numbers in their shortest
    form, a missing text cell empty."""
    if cell is None:
        return ""
    return str(cell.item() if isinstance(cell, np.generic) else cell)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.model)
        if args.proba and model.output in VALUE_HEADS:
            raise ValueError(f"--proba: {args.model} predicts values (--output {model.output}), "
                             "not probabilities")
        x, table = sources.model_input(args.data, model, args.keep)
        unseen = sources.unseen_note(table)
        if unseen:
            sys.stderr.write(f"fastmlp-predict: warning: {args.data}: {unseen}\n")
        if not model.prediction_ready():  # on stderr: stdout may be the predictions
            sys.stderr.write(f"{PREDICT_COMPILE_NOTICE}...\n")
        text = predictions_csv(model, x, args.proba, table.kept)
        if args.output:
            atomic_write(args.output, [text.encode()])
        else:
            sys.stdout.write(text)
        return 0
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"fastmlp-predict: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
