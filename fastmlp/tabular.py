"""The user's own data files: a table of features and one target column,
read from CSV or TSV (compressed too), NumPy (.npy, .npz), Parquet or
Excel (.xlsx); the target's classes; the categories of text feature
columns, one-hot encoded; and the feature scaling learnt from the training
rows.

Every problem with a file is a DataError (a ValueError) that names the file,
and for CSV the line and the column.
"""
import bz2
import csv
import gzip
import hashlib
import lzma
import math
import os
import re

import numpy as np

SUFFIXES = (".csv", ".tsv", ".npy", ".npz", ".parquet", ".xlsx")
TEXT_SUFFIXES = (".csv", ".tsv")  # read compressed too, behind one of:
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
DELIMITERS = ",;\t|"  # a .csv file's is the one its header line holds most of
# in a file delimited by ';', as spreadsheets write where the decimal mark
# is a comma, a column of such numbers (at least one with a comma) is numeric
DECIMAL_COMMA = re.compile(r"[+-]?(\d+|\d*,\d+)")
MISSING = ("error", "drop", "mean")  # what to do with NaN or empty feature cells
NA_CELLS = {"", "nan", "NaN", "NA", "N/A", "null", "NULL", "?"}
# a text column with more distinct values than this, or with more than
# MANY_CATEGORIES of them and fewer than 2 rows a value, is refused: names,
# identifiers and free text are no categories
MAX_CATEGORIES = 100
MANY_CATEGORIES = 10


class DataError(ValueError):
    """A data file that cannot be used as it is."""


class Table:
    """features: (n, f) float64, NaN where a cell is missing; a column of
    text is one-hot encoded (its categories' columns in a row: 1 for its
    value, 0 for the others, NaN for a missing cell, all 0 for a value
    outside them). target: (n,) labels (numbers or strings) or None. names:
    the feature columns' names; categories: {name: values in order} of the
    text columns; unseen: {name: the values, a row each} of values outside
    the categories given; kept: {name: cells} of the columns read_table
    was asked to keep as they are."""

    def __init__(self, path, features, target, names, target_name, categories=None,
                 unseen=None, kept=None):
        self.path, self.features, self.target = path, features, target
        self.names, self.target_name = names, target_name
        self.categories, self.unseen, self.kept = categories or {}, unseen or {}, kept or {}

    def column_name(self, j):
        """The name of the feature column that gives features[:, j]."""
        if not self.names:
            return str(j)
        widths = input_widths(self.names, self.categories)
        return repr(self.names[int(np.searchsorted(np.cumsum(widths), j, side="right"))])


def input_widths(names, categories):
    """How many of a model's inputs each feature column takes: 1, or the
    number of its categories."""
    return [len(categories[name]) if name in categories else 1 for name in names]


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_table(path, target=None, need_target=True, feature_names=None, n_features=None,
               categories=None, ignore=None, keep=None):
    """The table in path. target: the target column's name (CSV, Parquet) or
    index (.npy; negative counts from the end); None takes a column named
    'target' or 'label', else the last. feature_names: when given, exactly
    these columns in this order are the features (for prediction; the target
    may then be absent); n_features: for prediction from an .npy file, how
    many features the model takes (an array one column wider holds a target).
    categories: a model's (the text columns and their values); None learns
    them, making every column of text categorical. ignore: columns, comma
    separated, that are no features. keep: columns, comma separated, whose
    cells the Table also holds as they are (Table.kept)."""
    path = os.fspath(path)
    suffix, opener = file_type(path)
    if suffix not in SUFFIXES or opener and suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; fastmlp reads "
                        f"{', '.join(SUFFIXES)} (.csv and .tsv also compressed: "
                        f"{', '.join(COMPRESSED)})")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if keep and suffix in (".npz", ".npy"):
        raise DataError(f"{path}: an {suffix} file has no named columns to keep")
    if suffix == ".npz":
        return read_npz(path, need_target)
    if suffix == ".npy":
        return read_npy(path, target, need_target, n_features)
    readers = {".parquet": read_parquet, ".xlsx": read_excel}
    names, columns = read_csv(path) if suffix in TEXT_SUFFIXES else readers[suffix](path)
    return split_columns(path, names, columns, target, need_target, feature_names, categories,
                         ignore, keep)


def file_type(path):
    """(suffix, opener): the file's suffix, lower case, behind any
    compression suffix, and the opener of that compression (or None)."""
    root, suffix = os.path.splitext(os.fspath(path).lower())
    opener = COMPRESSED.get(suffix)
    return (os.path.splitext(root)[1] if opener else suffix), opener


def open_binary(path):
    return (file_type(path)[1] or open)(path, "rb")


def open_text(path):
    return (file_type(path)[1] or open)(path, "rt", newline="", encoding="utf-8-sig")


def delimiter(path, first=None):
    """A .tsv file's tab; for a .csv file, whichever of DELIMITERS its
    first line (bytes; read here if not given) holds most of (a comma for
    none)."""
    if file_type(path)[0] == ".tsv":
        return "\t"
    if first is None:
        try:
            with open_binary(path) as f:
                first = f.readline()
        except (OSError, EOFError, lzma.LZMAError) as exc:  # a damaged compressed file
            raise DataError(f"{path}: cannot read: {exc}") from None
    # (the first of equals: a comma)
    return max(DELIMITERS, key=first.decode("utf-8", errors="replace").count)


# an unnamed first column before named ones is a row index (pandas writes
# one by default): read under this name, then left out
ROW_INDEX = "\0row index"


def named_row_index(header):
    """header, its unnamed first column named ROW_INDEX if it is a row index."""
    if len(header) > 1 and header[0] == "" and all(header[1:]):
        return [ROW_INDEX] + header[1:]
    return header


def without_row_index(header, columns):
    if header and header[0] == ROW_INDEX:
        return header[1:], columns[1:]
    return header, columns


# pyarrow's reader pays for itself from a few MB: importing it takes 0.3 s,
# about what Python's csv module takes to read 4 MB of numbers (Zen 3; both
# 0.6 s for 8 MB, in a new process). A compressed file counts 2.5 times its
# size, about what a CSV of numbers gains from gzip.
ARROW_MIN_BYTES = 4 << 20


def read_csv(path):
    """(header, columns): the cells of each column as a tuple of strings, or
    as an array where read_csv_arrow could parse them. The first line is the
    header; an unnamed first column (a row index) is left out."""
    try:
        size = os.path.getsize(path) * (2.5 if file_type(path)[1] else 1)
    except OSError:
        size = ARROW_MIN_BYTES  # read_csv_arrow, or the careful path, names the problem
    fast = read_csv_arrow(path) if size >= ARROW_MIN_BYTES else None
    if fast is not None:
        return without_row_index(*fast)
    sep = delimiter(path)
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, line 1: {exc}") from None
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise DataError(f"{path}: cannot read: {exc}") from None
        header = named_row_index([name.strip() for name in header])
        check_header(path, header)
        rows = []
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}, line {reader.line_num}: {len(row)} cells, the "
                                    f"header has {len(header)}")
                rows.append(row)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
        except (OSError, EOFError, lzma.LZMAError) as exc:  # a damaged compressed file
            raise DataError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise DataError(f"{path}: no rows below the header")
    return without_row_index(header, decimal_commas(list(zip(*rows)), sep))


def decimal_commas(columns, sep):
    """columns, with those of numbers written with a decimal comma (in a
    file delimited by ';') as float64 arrays."""
    if sep != ";":
        return columns
    for j, cells in enumerate(columns):
        if isinstance(cells, np.ndarray):
            continue
        texts = ["" if cell is None else cell.strip() for cell in cells]
        given = [text for text in texts if text not in NA_CELLS]
        if given and any("," in text for text in given) \
                and all(DECIMAL_COMMA.fullmatch(text) for text in given):
            columns[j] = np.array([math.nan if text in NA_CELLS else float(text.replace(",", "."))
                                   for text in texts])
    return columns


def read_csv_arrow(path):
    """read_csv's answer through pyarrow's CSV reader, which splits the
    cells in C++ and parses numbers a column at a time (a 48 MB file of
    100,000 x 51 numbers: 0.9-1.1 s against 4.9-5.3 s). A column becomes an
    array where pyarrow parses every cell as a decimal integer, or as a
    float with at least one value not whole and none NaN: the careful path
    makes the same int64 or float64 array of such cells (what pyarrow takes
    of them, Python's int() and float() take alike: tests/test_fuzz.py;
    what only they take, such as spaces, underscores or other scripts'
    digits, goes to the careful path). Other columns stay strings for it.
    None without pyarrow, for a file with a double quote (quoting rules
    differ) or one pyarrow cannot read: read_csv then reads it itself and
    names any problem."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    try:
        with open_binary(path) as f:
            raw = f.read()  # once (decompressed once): scanned for quotes, then parsed
        if b'"' in raw:
            return None
        first = raw.split(b"\n", 1)[0].rstrip(b"\r")
        sep = delimiter(path, first)
        header = named_row_index([name.strip() for name in
                                  next(csv.reader([first.decode("utf-8-sig")], delimiter=sep))])
        table = pacsv.read_csv(
            pa.BufferReader(raw), read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=False))
    except (StopIteration, csv.Error, UnicodeDecodeError, ValueError, pa.ArrowException,
            OSError, EOFError, lzma.LZMAError):
        return None  # (an empty file, bad UTF-8, a row of another width, ...)
    if not header or table.num_rows == 0 or len(set(header)) != len(header) or not all(header):
        return None
    columns = []
    for name in header:
        cells = table.column(name)
        values = None
        # (pyarrow's integers include hexadecimal ones, which int() refuses)
        hexadecimal = pc.any(pc.match_substring(cells, "x", ignore_case=True)).as_py()
        for kind in [pa.float64()] if hexadecimal else [pa.int64(), pa.float64()]:
            try:
                values = pc.cast(cells, kind).to_numpy()
                break
            except pa.ArrowException:
                pass
        if values is not None and values.dtype == np.float64 and (
                np.isnan(values).any() or (values == np.round(values)).all()):
            values = None  # int() could take them all, or NaN: the careful path decides
        columns.append(tuple(cells.to_pylist()) if values is None else values)
    return header, decimal_commas(columns, sep)


def check_header(path, header):
    if any(not name for name in header):
        raise DataError(f"{path}, line 1: a column has no name (the first line must be a header)")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}, line 1: column {repeated[0]!r} appears twice")


def read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    header = list(table.column_names)
    check_header(path, header)
    return header, [table.column(name).to_numpy(zero_copy_only=False) for name in header]


def read_excel(path):
    """(header, columns) of an .xlsx file's first worksheet, through
    openpyxl: the first row is the header, the cells as Excel holds them
    (numbers, text, None where empty); rows with no value are skipped, and
    unnamed columns with no value at all (beyond the table) left out."""
    try:
        import openpyxl
    except ImportError:
        raise DataError(f"{path}: reading Excel needs openpyxl: pip install openpyxl") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # a damaged file: zipfile's, openpyxl's or XML's errors
        raise DataError(f"{path}: cannot read Excel: {exc}") from None
    try:
        rows = [row for row in book.worksheets[0].iter_rows(values_only=True)
                if any(cell is not None for cell in row)]
    finally:
        book.close()
    if not rows:
        raise DataError(f"{path}: the worksheet is empty")
    header = ["" if name is None else str(name).strip() for name in rows[0]]
    columns = list(zip(*rows[1:])) if len(rows) > 1 else [()] * len(header)
    used = [j for j, name in enumerate(header)
            if name or any(cell is not None for cell in columns[j])]
    header = named_row_index([header[j] for j in used])
    check_header(path, header)
    if len(rows) == 1:
        raise DataError(f"{path}: no rows below the header")
    return without_row_index(header, [columns[j] for j in used])


def read_npz(path, need_target):
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "X" not in archive.files or (need_target and "y" not in archive.files):
                raise DataError(f"{path}: an .npz file must hold arrays 'X' and 'y'; it has "
                                f"{', '.join(archive.files) or 'none'}")
            X, y = archive["X"], archive["y"] if "y" in archive.files else None
    except (OSError, EOFError) as exc:  # also zipfile.BadZipFile
        raise DataError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    features = numeric_matrix(path, X, "X")
    name = "y"
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        n = features.shape[0]
        if y.ndim not in (1, 2) or y.shape[0] != n or 0 in y.shape:
            raise DataError(f"{path}: y must have a row per row of X, shape ({n},) or ({n}, "
                            f"outputs); got shape {y.shape}")
        check_target_cells(path, y, "y")
        if y.ndim == 2:  # several outputs (linear, sigmoid) or one-hot rows (softmax)
            name = ",".join(f"y{k}" for k in range(y.shape[1]))
    return Table(path, features, y, None, name)


def read_npy(path, target, need_target, n_features):
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    array = numeric_matrix(path, array, "the array")
    width = array.shape[1]
    if not need_target and width == n_features:
        return Table(path, array, None, None, None)
    index = -1 if target is None else target
    try:
        index = int(index)
        if not -width <= index < width:
            raise ValueError
    except ValueError:
        raise DataError(f"{path}: the target of an .npy file is a column index in "
                        f"{-width}..{width - 1}, got {target!r}") from None
    index %= width
    y = array[:, index]
    check_target_cells(path, y, f"column {index}")
    return Table(path, np.delete(array, index, axis=1), y, None, str(index))


def numeric_matrix(path, array, name):
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == bool) or np.iscomplexobj(array):
        raise DataError(f"{path}: {name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(f"{path}: {name} must be a non-empty 2-D array (rows, columns), got "
                        f"shape {array.shape}")
    return np.asarray(array, np.float64)


def check_target_cells(path, y, name):
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])
        raise DataError(f"{path}: the target {name} is NaN or inf in row {row + 1}")


def split_columns(path, names, columns, target, need_target, feature_names, categories=None,
                  ignore=None, keep=None):
    """The Table of named columns (strings from CSV or arrays from Parquet).
    target may name several columns, comma separated (multi-output); the
    rest as read_table says."""
    if feature_names is not None:
        missing = [name for name in feature_names if name not in names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r}, which the model was trained "
                            f"on; the file has {', '.join(names)}")
        wanted = target.split(",") if target else []
        target_name = target if wanted and all(t in names for t in wanted) else None
        chosen = list(feature_names)
    else:
        if target is None:
            target = next((n for n in ("target", "label") if n in names), names[-1])
        absent = [t for t in target.split(",") if t not in names]
        if absent:
            raise DataError(f"{path}: no target column {absent[0]!r}; the columns are "
                            f"{', '.join(names)}")
        target_name = target
        left_out = ignore.split(",") if ignore else []
        unknown = [name for name in left_out if name not in names]
        if unknown:
            raise DataError(f"{path}: no column {unknown[0]!r} to ignore; the columns are "
                            f"{', '.join(names)}")
        chosen = [name for name in names if name not in target.split(",") + left_out]
        if not chosen:
            raise DataError(f"{path}: no feature columns besides the target {target!r}")
    by_name = dict(zip(names, columns))
    kept = {}
    for name in keep.split(",") if keep else []:
        if name not in by_name:
            raise DataError(f"{path}: no column {name!r} to keep; the columns are "
                            f"{', '.join(names)}")
        kept[name] = by_name[name]
    features, categories, unseen = feature_matrix(path, chosen, by_name, categories)
    y = None
    if target_name is not None and (need_target or feature_names is None):
        parts = target_name.split(",")
        if len(parts) == 1:
            y = target_values(path, target_name, by_name[target_name])
        else:
            y = np.column_stack([numeric_column(path, t, by_name[t]) for t in parts])
            if np.isnan(y).any():
                row = int(np.flatnonzero(np.isnan(y).any(axis=1))[0])
                raise DataError(f"{path}, line {row + 2}: a target is missing")
    return Table(path, features, y, chosen, target_name, categories, unseen, kept)


def feature_matrix(path, chosen, by_name, categories):
    """(features, categories, unseen) of the chosen columns: numbers as
    they are, a column of text one-hot encoded (Table). categories None:
    every column of text is categorical, its values learnt; else exactly
    the columns it names are, with its values."""
    learning = categories is None
    blocks, found, unseen, too_many = [], {}, {}, []
    for name in chosen:
        cells = by_name[name]
        if not learning and name not in categories:
            blocks.append(numeric_column(path, name, cells)[:, None])
            continue
        if learning:
            values = numeric_column(path, name, cells, allow_text=True)
            if values is not None:
                blocks.append(values[:, None])
                continue
        texts, rows = category_texts(cells)
        if learning:
            known, given = learn_categories(texts, rows)
            if too_many_categories(len(known), given):
                too_many.append((name, len(known), given))
                continue
        else:
            known = categories[name]
        encoded, others = one_hot(texts, rows, known)
        blocks.append(encoded)
        found[name] = known
        if others:
            unseen[name] = others
    if too_many:
        raise too_many_error(path, too_many)
    return np.hstack(blocks), found, unseen


def category_texts(cells):
    """(texts, rows): the distinct cells of a text column as stripped
    strings (None for a missing one), and each row's index into them; the
    strings are made once per distinct cell, not once per row."""
    index = {}
    rows = np.fromiter((index.setdefault(cell, len(index)) for cell in cells), np.int64,
                       len(cells))
    texts = ["" if cell is None else str(cell).strip() for cell in index]
    return [None if text in NA_CELLS else text for text in texts], rows


def learn_categories(texts, rows):
    """(the sorted values of a text column (category_texts), the number of
    rows that give one)."""
    values = sorted(set(texts) - {None})
    given = int(np.count_nonzero(np.array([text is not None for text in texts])[rows]))
    return values, given


def too_many_error(path, columns):
    """The DataError for text columns (name, distinct values, rows given)
    with too many values, naming them all and the --ignore that leaves them
    out."""
    several = len(columns) > 1
    listed = ", ".join(f"{name!r} ({n} distinct values in {given} rows)"
                       for name, n, given in columns)
    return DataError(f"{path}: {'columns' if several else 'column'} {listed} "
                     f"{'hold' if several else 'holds'} text with too many distinct values to "
                     f"encode as categories (at most {MAX_CATEGORIES}, and 2 rows a value on "
                     f"average); leave {'them' if several else 'it'} out with --ignore "
                     f"{','.join(name for name, _, _ in columns)}")


def too_many_categories(n_values, given):
    """Whether a text column has too many values to one-hot encode: more
    than MAX_CATEGORIES, or more than MANY_CATEGORIES with fewer than 2
    rows a value (names, ids)."""
    return n_values > MAX_CATEGORIES or (n_values > MANY_CATEGORIES and given < 2 * n_values)


def one_hot(texts, rows, categories):
    """(encoded (n, k) float64, the values of the rows not in categories)
    of a text column (category_texts): a row holds 1 in its value's column
    and 0 elsewhere, NaN throughout for a missing cell, 0 throughout for a
    value not in categories."""
    lookup = {value: k for k, value in enumerate(categories)}
    missing, unseen = -1, -2
    codes = np.array([missing if text is None else lookup.get(text, unseen) for text in texts],
                     np.int64)[rows]
    encoded = np.zeros((len(rows), len(categories)), np.float64)
    known = np.flatnonzero(codes >= 0)
    encoded[known, codes[known]] = 1.0
    encoded[codes == missing] = math.nan
    return encoded, [texts[d] for d in rows[codes == unseen]]


def numeric_column(path, name, cells, allow_text=False):
    """cells as float64, NaN for a missing cell; anything else that is not a
    number is an error naming the line and the column. With allow_text,
    None for a column of text: one with no cell a number and some cell not."""
    if isinstance(cells, np.ndarray) and cells.dtype != object:
        if allow_text and cells.dtype.kind == "U":
            return numeric_column(path, name, cells.astype(object), allow_text)
        if not (np.issubdtype(cells.dtype, np.number) or cells.dtype == bool):
            hint = (f"; leave it out with --ignore {name}, or make it numbers (a date's "
                    "year, day of the year, ...) first" if allow_text else "")
            raise DataError(f"{path}: column {name!r} holds {cells.dtype}, not numbers{hint}")
        return cells.astype(np.float64)
    try:  # every cell a number: NumPy parses strings as float() does
        return np.array(cells, dtype=np.float64)
    except (TypeError, ValueError):
        pass
    values = np.empty(len(cells), np.float64)
    for i, cell in enumerate(cells):
        if cell is None:
            values[i] = math.nan
            continue
        text = cell.strip() if isinstance(cell, str) else cell
        if isinstance(text, str) and text in NA_CELLS:
            values[i] = math.nan
            continue
        try:
            values[i] = float(text)
        except (TypeError, ValueError):
            if allow_text and is_text(cells):
                return None
            raise DataError(f"{path}, line {i + 2}, column {name!r}: {cell!r} is not a "
                            "number") from None
    return values


def is_text(cells):
    """Whether no cell is a number (some cell is not, as numeric_column
    found), judged once per distinct cell; cells that cannot be told apart
    by value (Parquet lists) are no text."""
    try:
        distinct = set(cells)
    except TypeError:
        return False
    return not any(is_number(cell) for cell in distinct)


def is_number(cell):
    """Whether a cell (not a missing one) is a number as float() reads it."""
    if cell is None or isinstance(cell, str) and cell.strip() in NA_CELLS:
        return False
    try:
        float(cell.strip() if isinstance(cell, str) else cell)
        return True
    except (TypeError, ValueError):
        return False


def target_values(path, name, cells):
    """The target column: integers or floats when every cell is one, else strings."""
    if isinstance(cells, np.ndarray) and cells.dtype != object:
        check_target_cells(path, cells, f"column {name!r}")
        return cells
    texts = ["" if cell is None else str(cell).strip() for cell in cells]
    for i, text in enumerate(texts):
        if text in NA_CELLS:
            raise DataError(f"{path}, line {i + 2}, column {name!r}: the target is missing")
    for kind in (int, float):
        try:
            values = np.array([kind(text) for text in texts])
        except ValueError:
            continue
        check_target_cells(path, values, f"column {name!r}")
        return values
    return np.array(texts)


def handle_missing(table, policy, remedy="choose --missing drop or --missing mean"):
    """Applies a missing-cell policy to table (NaN cells in its features):
    'error' refuses them (the message ends with remedy), 'drop' drops their
    rows, anything else leaves them for fill_missing. Returns the table."""
    bad = np.isnan(table.features)
    if policy not in ("error", "drop") or not bad.any():
        return table
    rows = np.flatnonzero(bad.any(axis=1))
    if policy == "error":
        column = int(np.flatnonzero(bad[rows[0]])[0])
        by_column = {}  # (a text column's one-hot inputs are missing together)
        for j in np.flatnonzero(bad.any(axis=0)):
            name = table.column_name(j)
            by_column[name] = max(by_column.get(name, 0), int(np.count_nonzero(bad[:, j])))
        counts = ", ".join(f"{name} {count}" for name, count in
                           sorted(by_column.items(), key=lambda item: -item[1]))
        raise DataError(f"{table.path}: {len(rows)} {'rows have' if len(rows) > 1 else 'row has'} "
                        f"missing or NaN features (the first "
                        f"is row {rows[0] + 1}, column {table.column_name(column)}; rows "
                        f"missing by column: {counts}); {remedy}")
    keep = np.ones(len(table.features), bool)
    keep[rows] = False
    if not keep.any():
        raise DataError(f"{table.path}: every row has a missing feature")
    table.features = table.features[keep]
    if table.target is not None:
        table.target = table.target[keep]
    return table


def fill_missing(features, fill):
    """Puts fill[j] in the NaN cells of column j, in place."""
    bad = np.isnan(features)
    if bad.any():
        features[bad] = np.take(fill, np.nonzero(bad)[1])


def learn_scaling(features):
    """(mean, scale) of every column, NaN cells left out; scale 1 where a
    column is constant."""
    if np.isnan(features).all(axis=0).any():
        raise DataError("a feature column has no values at all")
    mean = np.nanmean(features, axis=0)
    scale = np.nanstd(features, axis=0)
    scale[~(scale > 0)] = 1.0
    return mean, scale


def numeric_targets(path, y, output):
    """y as float64 for the linear head (numbers), the sigmoid head (0/1) or
    the poisson head (numbers >= 0); a problem names the file."""
    if y.dtype.kind not in "biuf":
        raise DataError(f"{path}: the {output} output needs numeric targets; the target "
                        f"holds {y[:1].tolist()[0]!r}")
    y = np.asarray(y, np.float64)
    if output == "sigmoid" and not np.isin(y, (0, 1)).all():
        raise DataError(f"{path}: the sigmoid (multi-label) output needs 0/1 targets; the "
                        f"target holds {np.setdiff1d(np.unique(y), (0, 1))[0].item()!r}")
    if output == "poisson" and (y < 0).any():
        raise DataError(f"{path}: the poisson output needs counts or rates >= 0; the target "
                        f"holds {y[y < 0][0].item()!r}")
    return y


def not_one_hot(y):
    """Which rows of a numeric y (n, K) are not one-hot: a single 1, the
    rest 0."""
    hot = y == 1
    return ~(hot | (y == 0)).all(axis=1) | (hot.sum(axis=1) != 1)


def one_hot_classes(path, y, names):
    """The class of each one-hot row of y (n, K), as names[column of its 1];
    anything but a single 1 per row (the rest 0) is a DataError."""
    bad = not_one_hot(y) if y.dtype.kind in "biuf" else np.ones(len(y), bool)  # text: none
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: the softmax output takes several target columns as one-hot "
                        f"rows only (a single 1 per row, the rest 0), and row {row + 1} holds "
                        f"{y[row].tolist()}; --output linear or sigmoid fits them as values "
                        "or labels")
    return np.array(names, dtype=object)[np.argmax(y == 1, axis=1)]


def encode_labels(path, y, classes=None):
    """(codes int32, classes): codes index the sorted classes of y, or the
    given classes (labels outside them are an error)."""
    if classes is None:
        classes = np.unique(y).tolist()
        if len(classes) < 2:
            raise DataError(f"{path}: the target has a single class ({classes[0]!r}); a "
                            "classifier needs at least 2")
    lookup = {label: i for i, label in enumerate(classes)}
    try:
        codes = np.array([lookup[label] for label in y.tolist()], np.int32)
    except KeyError as exc:
        raise DataError(f"{path}: label {exc.args[0]!r} is not one of the model's classes "
                        f"{classes}") from None
    return codes, classes
