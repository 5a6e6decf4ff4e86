"""The analysis output folder, written all at once or not at all.

`stage(out)` checks `--out` before any work (a regular file, or a folder that cannot be
written, is an OSError with one line) and makes a staging folder next to it,
`.<name>.staging-<pid>`. The report, tables and figures are written there; `publish`
then moves each file into place, and on any failure puts the previous files back, so that
`out` holds either the previous set of outputs or the new one, never a mixture.

Only the files of an analysis are touched: `out/.outputs.json` lists them, and files that
the previous analysis wrote and this one did not (say, the figures of a weight-decay run
no longer analysed) are removed; anything else in `out` is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = ".outputs.json"


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def stage(out: str | os.PathLike) -> Path:
    """Checks that `out` can take the outputs and returns a new, empty staging folder next to it.

    Raises:
        OSError: `out` (or a folder above it) is not a directory, or cannot be written; the
            message is one line naming the path.
    """
    out = Path(out)
    base = _nearest_existing(out)
    if not base.is_dir():
        where = "" if base == out.absolute() else f" ({base} above it is a file)"
        raise NotADirectoryError(f"--out {out} is not a directory{where}")
    if out.is_dir():
        # A probe, because permission bits say nothing for root or on a read-only mount.
        try:
            fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OSError(e.errno, f"--out {out} cannot be written ({e.strerror})") from None
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        staging = out.absolute().parent / f".{out.absolute().name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as e:
        raise OSError(e.errno, f"--out {out}: cannot write next to it ({e.strerror or e})") from None
    return staging


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _previous(out: Path) -> list[str]:
    try:
        listed = json.loads((out / MANIFEST).read_text())["files"]
        return [str(f) for f in listed]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def publish(staging: Path, out: str | os.PathLike, *, keep: tuple[str, ...] = ()) -> list[str]:
    """Moves every file of `staging` into `out` (same relative paths) and removes `staging`.

    Files listed by the previous manifest and not written now are removed, except those
    under the folders in `keep` (e.g. 'figures/' when the figures were not redrawn). On
    failure every file is put back as it was and the OSError is raised.

    Returns:
        The relative paths now in the manifest.
    """
    out = Path(out)
    new = [f for f in _files(staging) if f != MANIFEST]
    kept = [f for f in _previous(out) if f not in new and f.startswith(keep) and (out / f).exists()]
    stale = [f for f in _previous(out) if f not in new and f not in kept and f != MANIFEST]
    listed = sorted(new + kept)
    (staging / MANIFEST).write_text(json.dumps({"files": listed}, indent=1) + "\n")
    backup = staging.with_name(staging.name + "-previous")
    saved: list[str] = []
    placed: list[str] = []
    try:
        for f in [*new, *stale, MANIFEST]:
            if (out / f).is_file() or (out / f).is_symlink():
                (backup / f).parent.mkdir(parents=True, exist_ok=True)
                os.replace(out / f, backup / f)
                saved.append(f)
        for f in [*new, MANIFEST]:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f, out / f)
            placed.append(f)
    except OSError:
        for f in placed:
            os.replace(out / f, staging / f)
        for f in saved:
            os.replace(backup / f, out / f)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return listed
