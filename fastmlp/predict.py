"""fastmlp-predict: a saved model's predictions for the rows of a file."""
import argparse
import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections import namedtuple

import numpy as np

from . import __version__, jit, sources
from .cli import Parser, UsageError
from .heads import VALUE_HEADS
from .files import atomic_write
from .modelfile import load as load_model
from .progress import PREDICT_COMPILE_NOTICE

EXAMPLES = """examples:
  fastmlp-predict model.safetensors new.csv       one predicted label per row, to stdout
  ... | fastmlp-predict model.safetensors - > out.csv
                                                  a table from a pipe, predictions to one
  fastmlp-predict model.safetensors new.csv --proba -o out.csv
                                                  and each class's probability, to a file
  fastmlp-predict model.safetensors new.csv --keep id
                                                  each row's id, then its prediction
  fastmlp-predict model.safetensors new.parquet -o predictions.parquet
                                                  typed columns, for pandas, Spark, DuckDB
  fastmlp-predict digits.safetensors images.npy   8-bit pixels, one image per row

The file's columns are found by the names the model was trained on (other
columns, the target among them, are ignored) and encoded and scaled as in
training (a text value not seen in training is none of the categories);
predicted values (--output linear) are in the target's own units.
exit codes: 0 success, 2 usage error or bad input
"""


def build_parser():
    parser = Parser(prog="fastmlp-predict", description="Predict with a model saved by "
                    "fastmlp-train --save: one row per row of DATA, in order (CSV, or -o's "
                    "format): the class label, the predicted values (--output linear) or one "
                    "0/1 column per label (--output sigmoid).",
                    epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("model", metavar="MODEL", help="a model file")
    parser.add_argument("data", metavar="DATA", help="rows to predict: a table as "
                        "fastmlp-train --data reads (.csv, .tsv, compressed too, .parquet, .xlsx), .npz "
                        "(array X) or .npy; - reads a CSV or TSV table from standard input")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the predictions "
                        "here, atomically, in the format of the file's ending: .csv (also "
                        "without one), .tsv, .json (a list of row objects), .parquet, .xlsx "
                        "(default, or -: CSV on standard output)")
    parser.add_argument("--proba", action="store_true",
                        help="add one column per class (or label) with its probability")
    parser.add_argument("--keep", metavar="COLUMNS", help="columns of DATA to copy into the "
                        "output first, as they are (an id, say), comma separated")
    return parser


def output_writer(path):
    """The writer (WRITERS) for -o FILE's ending: CSV for none, or for "-"
    (standard output)."""
    ending = "" if path in (None, "-") else os.path.splitext(path)[1].lower()
    if ending and ending not in WRITERS:
        raise UsageError(f"-o {path}: fastmlp-predict writes {', '.join(WRITERS)} "
                         f"(by the file's ending), not {ending}")
    return WRITERS.get(ending, text_table)


# A column of the output: its values are Python numbers, strings or None;
# digits, the significant digits its floats are written with as text (None
# for labels, 0/1 flags and kept columns); kept: a column of DATA, copied
Column = namedtuple("Column", ["name", "values", "digits", "kept"])


def prediction_columns(model, x, proba, kept=None):
    """[Column]: the output, kept ones first (kept: {name: cells} of the
    data's columns, as they are). softmax: a 'prediction' column of labels,
    then with proba one probability column per class; linear, poisson: one
    column per target; sigmoid: a 0/1 column per label, then with proba one
    probability column each."""
    columns = [Column(name, [cell_value(cell) for cell in cells], None, True)
               for name, cells in (kept or {}).items()]
    prep = model.preprocessing
    if model.output in VALUE_HEADS:
        names = prep["target"].split(",") if prep else [f"y{k}" for k in range(model.n_outputs)]
        values = sources.target_values(model.predict(x).reshape(len(x), -1), prep)
        return columns + [Column(name, values[:, k].tolist(), 9, False)
                          for k, name in enumerate(names)]
    probabilities = model.predict_proba(x).astype(np.float64)
    classes = prep["classes"] if prep is not None else list(range(model.n_outputs))
    chances = ([Column(f"p({label})", probabilities[:, k].tolist(), 6, False)
                for k, label in enumerate(classes)] if proba else [])
    if model.output == "sigmoid":
        return columns + [Column(str(label), (probabilities[:, k] >= 0.5).astype(int).tolist(),
                                 None, False) for k, label in enumerate(classes)] + chances
    labels = [classes[label] for label in np.argmax(probabilities, axis=1)]
    return columns + [Column("prediction", labels, None, False)] + chances


def cell_value(cell):
    """A kept cell as a Python value: numbers as they are, a missing cell
    (empty, as fastmlp-train reads cells, or NaN) None."""
    value = cell.item() if isinstance(cell, np.generic) else cell
    return None if value == "" or (isinstance(value, float) and value != value) else value


INTEGER = re.compile(r"[+-]?(0|[1-9][0-9]*)")


def typed(columns):
    """columns, with kept columns of text (as a CSV file's are read) made
    numbers where every cell is one, as pandas reads them (but text with
    leading zeros stays text): for the formats that hold types."""
    def numbers(values):
        texts = [v for v in values if v is not None]
        if not texts or not all(isinstance(v, str) for v in texts):
            return values
        if all(INTEGER.fullmatch(v.strip()) for v in texts):
            return [None if v is None else int(v) for v in values]
        try:
            return [None if v is None else float(v) for v in values]
        except ValueError:
            return values

    return [column._replace(values=numbers(column.values)) if column.kept else column
            for column in columns]


def text_table(columns, delimiter=","):
    """CSV (or, with a tab, TSV) text: floats to their columns' digits, a
    missing cell empty."""
    def text(value, digits):
        if value is None:
            return ""
        return f"{value:.{digits}g}" if digits is not None else str(value)

    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow([column.name for column in columns])
    writer.writerows(zip(*[[text(value, column.digits) for value in column.values]
                           for column in columns]))
    return out.getvalue().encode()


def json_table(columns):
    """A JSON list with an object per row, as pandas' to_json(orient="records")."""
    columns = typed(columns)
    names = [column.name for column in columns]
    rows = [dict(zip(names, row)) for row in zip(*[column.values for column in columns])]
    return json.dumps(rows, allow_nan=False).encode() + b"\n"


def parquet_table(columns):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError("writing .parquet needs pyarrow: pip install 'fastmlp[parquet]'") from None
    columns = typed(columns)
    sink = io.BytesIO()
    pyarrow.parquet.write_table(
        pyarrow.table({column.name: pyarrow.array(column.values) for column in columns}), sink)
    return sink.getvalue()


def xlsx_table(columns):
    try:
        import openpyxl
    except ImportError:
        raise UsageError("writing .xlsx needs openpyxl: pip install 'fastmlp[excel]'") from None
    columns = typed(columns)
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("predictions")
    sheet.append([column.name for column in columns])
    for row in zip(*[column.values for column in columns]):
        sheet.append(row)
    sink = io.BytesIO()
    book.save(sink)
    return sink.getvalue()


# -o FILE's formats, by its ending
WRITERS = {".csv": text_table, ".tsv": lambda columns: text_table(columns, "\t"),
           ".json": json_table, ".parquet": parquet_table, ".xlsx": xlsx_table}


def standard_input(model, keep):
    """sources.model_input of a CSV (or TSV) table on standard input, read
    through a temporary file; messages name it '-'."""
    with tempfile.TemporaryDirectory(prefix="fastmlp-") as directory:
        path = os.path.join(directory, "stdin.csv")
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        try:
            return sources.model_input(path, model, keep)
        except ValueError as exc:
            raise ValueError(str(exc).replace(path, "-")) from None


def main(argv=None):
    if argv is None:  # run as fastmlp-predict: a process of its own
        jit.numba_without_scipy_linalg()
    args = build_parser().parse_args(argv)
    try:
        write = output_writer(args.output)
        model = load_model(args.model)
        if args.proba and model.output in VALUE_HEADS:
            raise ValueError(f"--proba: {args.model} predicts values (--output {model.output}), "
                             "not probabilities")
        if args.data == "-":
            x, table = standard_input(model, args.keep)
        else:
            x, table = sources.model_input(args.data, model, args.keep)
        unseen = sources.unseen_note(table)
        if unseen:
            sys.stderr.write(f"fastmlp-predict: warning: {args.data}: {unseen}\n")
        if not model.prediction_ready():  # on stderr: stdout may be the predictions
            sys.stderr.write(f"{PREDICT_COMPILE_NOTICE}...\n")
        written = write(prediction_columns(model, x, args.proba, table.kept))
        if args.output and args.output != "-":
            atomic_write(args.output, [written])
        else:
            sys.stdout.write(written.decode())  # (CSV: the binary formats need a file)
        return 0
    except (UsageError, ValueError, OSError) as exc:
        sys.stderr.write(f"fastmlp-predict: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
