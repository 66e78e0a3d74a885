"""fastmlp-predict: a saved model's predictions for the rows of a file."""
import argparse
import csv
import io
import sys

import numpy as np

from . import __version__, sources, tabular
from .cli import Parser
from .modelfile import atomic_write
from .modelfile import load as load_model

EXAMPLES = """examples:
  fastmlp-predict model.fmlp new.csv                      one predicted label per row, to stdout
  fastmlp-predict model.fmlp new.csv --proba -o out.csv   and each class's probability, to a file
  fastmlp-predict digits.fmlp images.npy                  8-bit pixels, one image per row

The file's columns are found by the names the model was trained on (other
columns, the target among them, are ignored) and scaled as in training.
exit codes: 0 success, 2 usage error or bad input
"""


def build_parser():
    parser = Parser(prog="fastmlp-predict", description="Predict with a model saved by "
                    "fastmlp-train --save: one line per row of DATA, in order, as CSV.",
                    epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("model", metavar="MODEL", help="a model file")
    parser.add_argument("data", metavar="DATA", help="rows to predict: .csv (with a header "
                        "line), .npz (array X), .npy or .parquet")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the CSV here, "
                        "atomically (default: standard output)")
    parser.add_argument("--proba", action="store_true",
                        help="add one column per class with its probability")
    return parser


def predictions_csv(model, x, proba):
    """The CSV text: a 'prediction' column of labels, then with proba one
    column per class."""
    probabilities = model.predict_proba(x)
    classes = (model.preprocessing["classes"] if model.preprocessing is not None
               else list(range(model.n_classes)))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["prediction"] + ([f"p({label})" for label in classes] if proba else []))
    labels = np.argmax(probabilities, axis=1)
    for label, row in zip(labels, probabilities):
        writer.writerow([classes[label]] + ([f"{p:.6g}" for p in row] if proba else []))
    return text.getvalue()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.model)
        x, _ = sources.model_input(args.data, model)
        text = predictions_csv(model, x, args.proba)
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
