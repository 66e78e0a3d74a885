"""Datasets in IDX format (MNIST, Fashion-MNIST)."""
import gzip
import os

import numpy as np

# IDX type byte -> big-endian NumPy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def load_idx(path):
    """Reads an IDX file (gzipped if its name ends in .gz) into a native-endian
    array. Raises ValueError naming the file when the header and the size
    disagree or the header is malformed."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip raises these for damaged streams
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read: {exc}") from None
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: the header's shape {shape} needs {expected} bytes, "
                         f"the file has {len(data)}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def load_directory(directory):
    """(x_train, y_train, x_test, y_test) from the four standard IDX files in
    directory (each gzipped or not); images flattened to (n, rows * cols)."""
    arrays = []
    for key, name in FILES.items():
        for candidate in (name + ".gz", name):
            path = os.path.join(directory, candidate)
            if os.path.exists(path):
                break
        else:
            raise FileNotFoundError(f"{directory}: no {name}[.gz]")
        array = load_idx(path)
        arrays.append(array.reshape(array.shape[0], -1) if key.startswith("x") else array)
    return tuple(arrays)
