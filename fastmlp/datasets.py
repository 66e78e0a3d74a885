"""Datasets: MNIST and Fashion-MNIST in IDX format, found locally or
downloaded from their public mirrors, and scikit-learn's 8x8 digits.

`load(name)` looks in $FASTMLP_DATA, then the user cache
($XDG_CACHE_HOME/fastmlp or ~/.cache/fastmlp), then (Fashion-MNIST only)
Debian's /usr/share/datasets/fashion-mnist; a directory may hold the four
files itself or in a subdirectory named after the dataset. Otherwise it
downloads into the cache, trying each mirror in turn, checking each file's
published MD5, and writing each file atomically. Given a data_dir, it looks
there alone and downloads there.

The first load of a gzipped file of UNPACK_MIN_BYTES or more keeps its
array uncompressed in the cache's unpacked/ directory, named after the
file's path, size and modification time; later loads read that copy
(Fashion-MNIST's images: gunzip 0.3 s, the copy 0.02 s). A copy that
cannot be written or read is done without.
"""
import contextlib
import gzip
import hashlib
import io
import math
import os
import sys
import zlib

import numpy as np

from .files import atomic_write, temporary_beside

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
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises these for damaged streams
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
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
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
        unpack = path.endswith(".gz") and os.path.getsize(path) >= UNPACK_MIN_BYTES
        array = load_gzipped(path) if unpack else load_idx(path)
        arrays.append(array.reshape(array.shape[0], -1) if key.startswith("x") else array)
    return tuple(arrays)


def unpacked_copy(path):
    """Where path's uncompressed copy lives in the cache: a name for the
    file (its real path) and one for this version of it (size, mtime)."""
    real = os.path.realpath(path)
    status = os.stat(real)
    source = hashlib.sha256(real.encode()).hexdigest()[:12]
    version = hashlib.sha256(f"{status.st_size}:{status.st_mtime_ns}".encode()).hexdigest()[:12]
    name = os.path.basename(real).removesuffix(".gz")
    return os.path.join(cache_dir(), "unpacked", f"{name}-{source}-{version}.npy")


def load_gzipped(path):
    """load_idx(path) of a .gz file, read from its uncompressed copy when
    there is one, else decompressed and copied (replacing the copies of the
    file's earlier versions)."""
    copy = unpacked_copy(path)
    with contextlib.suppress(OSError, ValueError, EOFError):  # none yet, or damaged
        return np.load(copy, allow_pickle=False)
    array = load_idx(path)
    with contextlib.suppress(OSError):  # no writable cache: load without a copy
        directory = os.path.dirname(copy)
        os.makedirs(directory, exist_ok=True)
        stem = os.path.basename(copy).rsplit("-", 1)[0]
        for old in os.listdir(directory):
            if old.startswith(stem + "-") and old.endswith(".npy"):
                os.unlink(os.path.join(directory, old))
        npy = io.BytesIO()
        np.save(npy, array, allow_pickle=False)
        atomic_write(copy, [npy.getbuffer()])
    return array


# name -> (mirrors, {IDX file name: published MD5 of its .gz})
DATASETS = {
    "mnist": (
        ["https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/",
         "http://yann.lecun.com/exdb/mnist/"],
        {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": (
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
        {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
NAMES = sorted(DATASETS) + ["digits"]
DOWNLOAD_TIMEOUT = 30  # seconds without data before a mirror is given up
UNPACK_MIN_BYTES = 1 << 20  # smaller .gz files decompress in milliseconds


class DatasetNotFound(OSError):
    """The data is in none of the places looked in, and could not be downloaded."""


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastmlp")


def has_idx_files(directory):
    return all(os.path.exists(os.path.join(directory, name)) or
               os.path.exists(os.path.join(directory, name + ".gz")) for name in FILES.values())


def candidate_dirs(name, data_dir=None):
    """Where load looks, in order: data_dir alone when it is given."""
    if data_dir:
        data_dir = os.fspath(data_dir)
        return [data_dir, os.path.join(data_dir, name)]
    dirs = []
    root = os.environ.get("FASTMLP_DATA")
    if root:
        dirs += [root, os.path.join(root, name)]
    dirs.append(os.path.join(cache_dir(), name))
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def available():
    """(name, where) of every dataset that loads without a download now."""
    found = []
    for name in DATASETS:
        directory = next((d for d in candidate_dirs(name) if has_idx_files(d)), None)
        if directory is not None:
            found.append((name, directory))
    try:
        import sklearn  # noqa: F401  (only whether digits can load)
        found.append(("digits", "ships with scikit-learn"))
    except ImportError:
        pass
    return found


def load(name, data_dir=None, download=True, progress=True):
    """(x_train, y_train, x_test, y_test): x as uint8 (n, features), y as
    integer labels. name: 'mnist', 'fashion-mnist' or 'digits'."""
    if name == "digits":
        return load_digits()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {NAMES}")
    dirs = candidate_dirs(name, data_dir)
    for directory in dirs:
        if has_idx_files(directory):
            return load_directory(directory)
    target = os.path.join(os.fspath(data_dir or cache_dir()), name)
    looked = " or ".join(dirs if data_dir else dirs[:1] + ["the other places it looks"])
    if not download:
        raise DatasetNotFound(f"{name}: no IDX files in {looked}, and downloading is off")
    mirrors, checksums = DATASETS[name]
    failures = fetch(mirrors, checksums, target, progress=progress)
    if failures:
        raise DatasetNotFound(f"{name} is not here and the download failed:\n"
                              + "\n".join(f"  {failure}" for failure in failures)
                              + f"\nput the four IDX files in {target} to use it offline")
    return load_directory(target)


def fetch(mirrors, checksums, directory, progress=True):
    """Downloads every file `name.gz` of checksums into directory from the
    first mirror that serves it whole with the right MD5. Returns the
    failures (empty when every file arrived)."""
    os.makedirs(directory, exist_ok=True)
    failures = []
    for name, md5 in checksums.items():
        filename = name + ".gz"
        destination = os.path.join(directory, filename)
        if os.path.exists(destination):
            continue
        errors = []
        for mirror in mirrors:
            try:
                download(mirror + filename, destination, md5, progress)
                break
            except (OSError, ValueError) as exc:
                errors.append(f"{mirror + filename}: {short_reason(exc)}")
        else:
            failures += errors
            break
    return failures


def short_reason(exc):
    """Why a download failed, in a few words (urllib nests its reasons)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        reason = getattr(reason, "strerror", None) or str(reason)
    return str(reason or exc)


def download(url, destination, md5, progress=True):
    """Fetches url into destination atomically; a wrong MD5 or a transfer
    that breaks off raises (ValueError or OSError) and leaves nothing."""
    import urllib.request  # here, not at the top: 40 ms of every start
    fd, tmp = temporary_beside(destination, prefix=".download-")
    try:
        digest = hashlib.md5()
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                out.write(block)
                digest.update(block)
                received += len(block)
                if progress:
                    shown = f"{received / total:6.1%}" if total else f"{received >> 10} KiB"
                    print(f"\rDownloading {url}: {shown}", end="", file=sys.stderr, flush=True)
            if total and received != total:
                raise OSError(f"transfer broke off after {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        if progress:
            print(file=sys.stderr)
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, destination)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


NPY_NAMES = ("x_train", "y_train", "x_test", "y_test")


def save_npy(arrays, directory):
    """Writes (x_train, y_train, x_test, y_test) as four .npy files in
    directory, for load_npy to memory-map; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, array in zip(NPY_NAMES, arrays):
        path = os.path.join(directory, name + ".npy")
        np.save(path, np.ascontiguousarray(array))
        paths.append(path)
    return paths


def drop_cached(path):
    """Writes path's pages to disk and drops them from the page cache, so
    that the next reads come from disk, as they do for data larger than
    memory. (Pages still cached may be mapped in large folios, so a memory
    map of a freshly written file can look far bigger in RSS.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def load_npy(directory):
    """(x_train, y_train, x_test, y_test) from save_npy's files, memory-mapped
    read-only: fit trains from the mapped pages without reading them into
    memory."""
    return tuple(np.load(os.path.join(directory, name + ".npy"), mmap_mode="r")
                 for name in NPY_NAMES)


def load_digits(test_fraction=0.2):
    """scikit-learn's bundled 8x8 digits (offline anywhere), pixels 0..16
    scaled to uint8 0..255, split into train and test at a fixed point after
    a fixed shuffle."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetNotFound("the digits dataset needs scikit-learn: "
                              "pip install 'fastmlp[digits]'") from None
    digits = sklearn_digits()
    x = np.round(digits.data * (255 / 16)).astype(np.uint8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    n_test = int(round(len(y) * test_fraction))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
