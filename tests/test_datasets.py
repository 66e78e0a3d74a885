"""IDX reading, dataset lookup, and downloads from a local HTTP server."""
import gzip
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from fastmlp import datasets
from fastmlp.datasets import FILES, load, load_directory, load_idx


def idx_bytes(array, type_code=0x08):
    array = np.asarray(array)
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(datasets.IDX_DTYPES[type_code]).tobytes()


def write_dataset(directory, n_train=30, n_test=10, gz=True, seed=0):
    """Four small IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
              "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, n_test).astype(np.uint8)}
    os.makedirs(directory, exist_ok=True)
    for key, name in FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            with gzip.open(os.path.join(directory, name + ".gz"), "wb") as f:
                f.write(data)
        else:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
    return arrays


@pytest.mark.parametrize("type_code", sorted(datasets.IDX_DTYPES))
def test_load_idx_reads_every_dtype(tmp_path, type_code):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(datasets.IDX_DTYPES[type_code])
    if type_code == 0x08:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array, type_code))
    loaded = load_idx(path)
    assert loaded.dtype.isnative and loaded.shape == (2, 3, 4)
    assert np.array_equal(loaded, array)


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b[:-1], "needs 24 bytes, the file has 23"),
    (lambda b: b + b"\0", "the file has 25"),
    (lambda b: b"\1" + b[1:], "bad magic number"),
    (lambda b: b[:2] + b"\x07" + b[3:], "bad magic number"),
    (lambda b: b[:6], "header is truncated"),
    (lambda b: b[:2], "too short"),
    (lambda b: b[:4] + b"\xff\xff\xff\xff" * 3 + b[16:], "needs"),
])
def test_load_idx_refuses_damaged_files_by_name(tmp_path, mutate, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 4), np.uint8) + 1)))
    with pytest.raises(ValueError, match=message) as info:
        load_idx(path)
    assert "bad.idx" in str(info.value)


def test_load_idx_refuses_a_truncated_gzip(tmp_path):
    data = gzip.compress(idx_bytes(np.ones((50, 50), np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.gz"):
        load_idx(path)


def test_load_directory_flattens_images_gz_or_not(tmp_path):
    for gz in (True, False):
        directory = tmp_path / str(gz)
        arrays = write_dataset(directory, gz=gz)
        x_train, y_train, x_test, y_test = load_directory(directory)
        assert x_train.shape == (30, 784) and x_test.shape == (10, 784)
        assert np.array_equal(x_train, arrays["x_train"].reshape(30, -1))
        assert np.array_equal(y_test, arrays["y_test"])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Uncompressed copies, even of small files, go to a cache of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "UNPACK_MIN_BYTES", 0)
    return tmp_path / "cache" / "fastmlp" / "unpacked"


def test_a_gzipped_file_is_read_from_its_copy_after_the_first_load(tmp_path, private_cache,
                                                                   monkeypatch):
    arrays = write_dataset(tmp_path / "data")
    first = load_directory(tmp_path / "data")
    assert len(os.listdir(private_cache)) == 4
    monkeypatch.setattr(gzip, "open", lambda *a, **k: pytest.fail("decompressed again"))
    again = load_directory(tmp_path / "data")
    for key, before, after in zip(FILES, first, again):
        assert np.array_equal(after, before) and after.dtype == before.dtype
    assert np.array_equal(again[0], arrays["x_train"].reshape(30, -1))


def test_a_changed_file_replaces_its_copy(tmp_path, private_cache):
    write_dataset(tmp_path / "data", seed=0)
    load_directory(tmp_path / "data")
    names = set(os.listdir(private_cache))
    arrays = write_dataset(tmp_path / "data", seed=1)
    for name in FILES.values():  # a new version whatever the clock's resolution
        os.utime(tmp_path / "data" / (name + ".gz"), ns=(0, 10**9))
    x_train, y_train, x_test, y_test = load_directory(tmp_path / "data")
    assert np.array_equal(x_train, arrays["x_train"].reshape(30, -1))
    assert np.array_equal(y_test, arrays["y_test"])
    now = set(os.listdir(private_cache))
    assert len(now) == 4 and not now & names


def test_a_damaged_copy_is_made_again(tmp_path, private_cache):
    arrays = write_dataset(tmp_path / "data")
    load_directory(tmp_path / "data")
    copy = next(private_cache.glob("train-images-*.npy"))
    copy.write_bytes(copy.read_bytes()[:200])
    assert np.array_equal(load_directory(tmp_path / "data")[0], arrays["x_train"].reshape(30, -1))
    assert np.array_equal(np.load(copy), arrays["x_train"])


def test_small_files_are_not_copied(tmp_path, private_cache, monkeypatch):
    monkeypatch.setattr(datasets, "UNPACK_MIN_BYTES", 30 * 784)  # the images' .gz is larger
    write_dataset(tmp_path / "data")
    load_directory(tmp_path / "data")
    assert [name.split("-")[0] for name in os.listdir(private_cache)] == ["train"]


def test_without_a_writable_cache_it_loads_without_a_copy(tmp_path, monkeypatch):
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-directory"))
    arrays = write_dataset(tmp_path / "data")
    for _ in range(2):
        assert np.array_equal(load_directory(tmp_path / "data")[1], arrays["y_train"])


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $FASTMLP_DATA, a private cache."""
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_lookup_order_data_dir_then_env_then_cache(isolated, monkeypatch):
    write_dataset(isolated / "cache" / "fastmlp" / "mnist", n_train=5, seed=1)
    assert load("mnist", download=False)[0].shape[0] == 5
    write_dataset(isolated / "env" / "mnist", n_train=6, seed=2)
    monkeypatch.setenv("FASTMLP_DATA", str(isolated / "env"))
    assert load("mnist", download=False)[0].shape[0] == 6
    write_dataset(isolated / "mine", n_train=7, seed=3)
    assert load("mnist", data_dir=isolated / "mine", download=False)[0].shape[0] == 7


def test_fashion_mnist_falls_back_to_debian(isolated):
    if not os.path.isdir(datasets.DEBIAN_FASHION_MNIST):
        pytest.fail("apt-get install dataset-fashion-mnist")
    assert load("fashion-mnist", download=False)[0].shape == (60000, 784)
    assert ("fashion-mnist", datasets.DEBIAN_FASHION_MNIST) in datasets.available()


def test_a_data_dir_given_is_the_only_place_looked(isolated):
    (isolated / "empty").mkdir()
    with pytest.raises(datasets.DatasetNotFound, match="empty"):
        load("fashion-mnist", data_dir=isolated / "empty", download=False)


def test_digits_works_offline():
    x_train, y_train, x_test, y_test = load("digits")
    assert x_train.dtype == np.uint8 and x_train.shape[1] == 64
    assert len(x_train) + len(x_test) == 1797 and x_train.max() == 255
    assert set(np.unique(y_train)) == set(range(10))


def test_unknown_name_and_no_download(isolated):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load("cifar")
    with pytest.raises(datasets.DatasetNotFound, match="downloading is off"):
        load("mnist", download=False)


class Server:
    """An HTTP server on 127.0.0.1 serving {path: bytes}; a path in `cut`
    announces its full length but sends half, then closes."""

    def __init__(self, files, cut=()):
        outer = self
        self.files, self.cut, self.requests = files, set(cut), []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if self.path in outer.cut else data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_tries_mirrors_checks_md5_and_writes_atomically(isolated, monkeypatch):
    source = isolated / "source"
    arrays = write_dataset(source, n_train=12, n_test=4)
    good = {name: (source / (name + ".gz")).read_bytes() for name in FILES.values()}
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in good.items()}
    names = list(FILES.values())
    # mirror a: a wrong file for the first name, a broken-off transfer for the second
    files = {f"/a/{names[0]}.gz": b"not the file", f"/a/{names[1]}.gz": good[names[1]]}
    files.update({f"/b/{name}.gz": data for name, data in good.items()})
    umask = os.umask(0o022)
    try:
        with Server(files, cut={f"/a/{names[1]}.gz"}) as server:
            monkeypatch.setitem(datasets.DATASETS, "mnist",
                                ([server.url + "/a/", server.url + "/b/"], md5))
            x_train, y_train, x_test, y_test = load("mnist", progress=False)
    finally:
        os.umask(umask)
    assert np.array_equal(x_train, arrays["x_train"].reshape(12, -1))
    assert np.array_equal(y_test, arrays["y_test"])
    assert f"/a/{names[0]}.gz" in server.requests and f"/b/{names[0]}.gz" in server.requests
    assert f"/a/{names[1]}.gz" in server.requests and f"/b/{names[1]}.gz" in server.requests
    cache = isolated / "cache" / "fastmlp" / "mnist"
    assert sorted(os.listdir(cache)) == sorted(name + ".gz" for name in names)  # no temp files left
    assert {(cache / name).stat().st_mode & 0o777 for name in os.listdir(cache)} == {0o644}
    # the second load reads the cache and asks no server
    monkeypatch.setitem(datasets.DATASETS, "mnist", (["http://127.0.0.1:9/"], md5))
    assert np.array_equal(load("mnist", download=False)[0], x_train)


def test_failed_download_says_what_it_tried(isolated, monkeypatch):
    md5 = {name: "0" * 32 for name in FILES.values()}
    with Server({}) as server:
        monkeypatch.setitem(datasets.DATASETS, "mnist", ([server.url + "/x/", server.url + "/y/"], md5))
        with pytest.raises(datasets.DatasetNotFound) as info:
            load("mnist", progress=False)
    message = str(info.value)
    assert "/x/train-images-idx3-ubyte.gz" in message and "/y/train-images-idx3-ubyte.gz" in message
    # one short line per source tried, then where the files may go
    lines = message.splitlines()
    assert len(lines) == 4 and all(len(line) < 80 for line in lines[:3])
    assert lines[1].endswith(": Not Found") and "to use it offline" in lines[3]
    assert os.listdir(isolated / "cache" / "fastmlp" / "mnist") == []


def test_wrong_checksum_everywhere_leaves_nothing(isolated, monkeypatch):
    md5 = {name: "0" * 32 for name in FILES.values()}
    files = {f"/m/{name}.gz": b"some bytes" for name in FILES.values()}
    with Server(files) as server:
        monkeypatch.setitem(datasets.DATASETS, "mnist", ([server.url + "/m/"], md5))
        with pytest.raises(datasets.DatasetNotFound, match="checksum mismatch"):
            load("mnist", progress=False)
    assert os.listdir(isolated / "cache" / "fastmlp" / "mnist") == []
