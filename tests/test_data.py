"""MNIST sources: IDX directory, cache verification, refusing bad bytes and unsafe pickles."""

import gzip
import io
import pickle
import struct

import numpy as np
import pytest

from grokjax import data


def _write_idx(path, a, gz):
    header = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(">" + "I" * a.ndim, *a.shape)
    raw = header + np.ascontiguousarray(a).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_dir(tmp_path, mnist, corrupt=False):
    d = tmp_path / "idx"
    d.mkdir()
    for i, (k, name) in enumerate(data.IDX_FILES.items()):
        a = mnist[k].copy()
        if corrupt and k == "x_test":
            a[0, 0, 0] ^= 1
        _write_idx(d / (name + (".gz" if i % 2 else "")), a, gz=bool(i % 2))
    return d


def test_idx_directory_source_is_verified_and_cached(tmp_path, mnist):
    cache = tmp_path / "cache"
    got = data.load_mnist(cache, _idx_dir(tmp_path, mnist), sources=("cache", "idx"), verbose=False)
    assert data.verify(got) == []
    assert (cache / data.CACHE_NAME).exists()
    again = data.load_mnist(cache, sources=("cache",), verbose=False)
    np.testing.assert_array_equal(again["x_train"], mnist["x_train"])


def test_wrong_bytes_are_refused_never_used(tmp_path, mnist):
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="does not match the pinned sha256"):
        with pytest.raises(data.DataError, match="digest mismatch"):
            data.load_mnist(cache, _idx_dir(tmp_path, mnist, corrupt=True), sources=("idx",), verbose=False)
    assert not (cache / data.CACHE_NAME).exists()


def test_corrupt_cache_is_skipped_for_the_next_source(tmp_path, mnist):
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = {k: v.copy() for k, v in mnist.items()}
    bad["y_train"][0] = (bad["y_train"][0] + 1) % 10
    np.savez(cache / data.CACHE_NAME, **bad)
    with pytest.warns(UserWarning, match="from cache does not match"):
        got = data.load_mnist(cache, _idx_dir(tmp_path, mnist), sources=("cache", "idx"), verbose=False)
    assert data.verify(got) == []
    assert data.verify(data.load_mnist(cache, sources=("cache",), verbose=False)) == []  # repaired


def test_unpickler_admits_only_numpy_arrays():
    ok = pickle.dumps((np.arange(3, dtype=np.float32), np.arange(2)))
    arrays = data._NumpyOnlyUnpickler(io.BytesIO(ok)).load()
    np.testing.assert_array_equal(arrays[0], [0, 1, 2])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_registry_blob_with_wrong_hash_is_rejected():
    with pytest.raises(data.DataError, match="unexpected sha256"):
        data._arrays_from_pkl_gz(gzip.compress(b"not mnist"))


def test_unknown_source_and_nothing_available(tmp_path):
    with pytest.raises(data.DataError, match="unknown MNIST source"):
        data.load_mnist(tmp_path, sources=("nowhere",))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_mnist(tmp_path, sources=("cache",), verbose=False)
