"""Bad inputs to the analysis (analysis/spectra.py) and to the MNIST loader (grokjax.data).

One real run (300 steps, 10 checkpoints) is trained and analysed once per session; each test
copies it, breaks one thing, and checks the one-line message, the exit code, and that the
files that were there before (the previous outputs, the inputs) are byte-identical after.
"""

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grokjax import data

ROOT = Path(__file__).resolve().parents[1]
SPECTRA = ROOT / "analysis" / "spectra.py"
FAST = ["--engine", "native", "--workers", "1", "--no-progress"]


def _spectra_main():
    from grokjax.analysis.cli import main  # noqa: PLC0415  (the code behind analysis/spectra.py)

    return main


SPECTRA_MAIN = _spectra_main()


@pytest.fixture(scope="session")
def golden(tmp_path_factory, run300):
    """The session's 300-step run (helpers.RUN300) without its monitor record, analysed once
    (outputs, figures and cache in <run>/analysis); built once per session, also under
    pytest-xdist (helpers.build_once), and only ever copied. These cases are about params
    checkpoints: with a monitor record, a missing or unreadable checkpoint costs nothing (the
    analysis reads the record)."""
    from helpers import build_once

    def build(folder):
        d = folder / "wd0"
        shutil.copytree(run300, d, ignore=shutil.ignore_patterns("monitor", "analysis"))
        assert SPECTRA_MAIN([str(d), *FAST]) == 0
        assert (d / "analysis" / "figures" / "fig3_traps.png").is_file()

    return build_once(tmp_path_factory, "golden", build) / "wd0"


@pytest.fixture
def run_dir(golden, tmp_path):
    d = tmp_path / "wd0"
    shutil.copytree(golden, d)
    return d


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _spectra(capfd, *argv):
    """(exit code, stderr lines) of an in-process spectra.py call."""
    try:
        code = SPECTRA_MAIN([*map(str, argv)])
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _only(lines, kind, *parts):
    """Asserts that `lines` is exactly one 'spectra.py: <kind>: ...' line holding `parts`."""
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"spectra.py: {kind}: "), lines
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def _metrics(d):
    return (d / "metrics.jsonl").read_text().splitlines()


def _truncate_checkpoint(d, step):
    biggest = max((p for p in (d / "checkpoints" / "params" / str(step)).rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(1000)


# --------------------------------------------------------------------------------------
# Run directories


def test_empty_directory(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    code, lines = _spectra(capfd, tmp_path / "empty", *FAST)
    assert code == 2
    _only(lines, "error", "no run directories (with config.json)")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("case, text, expected", [
    ("not_json", '{"config": {"seed": 0,', "config.json: not valid JSON"),
    ("future_format", None, "config.json: format 2 is newer than this code reads (1)"),
    ("no_seed", None, "config.json: field 'seed' is missing"),
])
def test_bad_config_fails_before_any_output(run_dir, capfd, case, text, expected):
    cfg = run_dir / "config.json"
    payload = json.loads(cfg.read_text())
    if case == "future_format":
        payload["format"] = 2
        text = json.dumps(payload)
    elif case == "no_seed":
        del payload["config"]["seed"]
        text = json.dumps(payload)
    cfg.write_text(text)
    before = _snapshot(run_dir)
    code, lines = _spectra(capfd, run_dir, *FAST)
    assert code == 2
    _only(lines, "error", expected)
    assert _snapshot(run_dir) == before


def test_unknown_config_field_warns_and_strict_refuses(run_dir, capfd):
    cfg = run_dir / "config.json"
    payload = json.loads(cfg.read_text())
    payload["config"]["label_noise"] = 0.1  # a field from a newer trainer
    cfg.write_text(json.dumps(payload))
    before = _snapshot(run_dir)
    code, lines = _spectra(capfd, run_dir, *FAST, "--no-figures", "--strict")
    assert code == 2
    _only(lines, "error", "config.json: unknown field(s) label_noise (written by a newer grokjax?)")
    assert _snapshot(run_dir) == before
    code, lines = _spectra(capfd, run_dir, *FAST, "--no-figures")
    assert code == 0
    _only(lines, "warning", "unknown field(s) label_noise")


def test_missing_metrics_file(run_dir, capfd):
    (run_dir / "metrics.jsonl").unlink()
    before = _snapshot(run_dir)
    code, lines = _spectra(capfd, run_dir, *FAST)
    assert code == 2
    _only(lines, "error", "metrics.jsonl: missing")
    assert _snapshot(run_dir) == before


# --------------------------------------------------------------------------------------
# metrics.jsonl lines


def _steps_table(d):
    return pd.read_csv(d / "analysis" / "all_steps.csv")


def test_torn_last_metrics_line_is_dropped_everywhere(run_dir, capfd):
    lines = _metrics(run_dir)
    last = json.loads(lines[-1])["step"]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:60]]) + "\n")
    before = _snapshot(run_dir)
    code, err = _spectra(capfd, run_dir, *FAST, "--no-figures", "--strict")
    assert code == 2
    _only(err, "error", f"metrics.jsonl line {len(lines)} (step {last}): not valid JSON")
    assert _snapshot(run_dir) == before

    code, err = _spectra(capfd, run_dir, *FAST, "--no-figures")
    assert code == 0
    _only(err, "warning", f"metrics.jsonl line {len(lines)} (step {last}): not valid JSON", "dropped")
    steps = _steps_table(run_dir)
    assert last not in set(steps["step"]) and steps["test/acc"].notna().all()
    layers = pd.read_csv(run_dir / "analysis" / "all_layers.csv")
    assert last not in set(layers["step"])  # its checkpoint is not analysed either
    phases = pd.read_csv(run_dir / "analysis" / "phases.csv")
    assert phases.loc[0, "anti_step"] < last


def test_nan_accuracy_line_is_dropped_everywhere(run_dir, capfd):
    lines = _metrics(run_dir)
    rec = json.loads(lines[4])
    step = rec["step"]
    rec["test/acc"] = float("nan")
    lines[4] = json.dumps(rec)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, err = _spectra(capfd, run_dir, *FAST, "--no-figures")
    assert code == 0
    _only(err, "warning", f"metrics.jsonl line 5 (step {step}): test/acc is nan; dropped")
    steps = _steps_table(run_dir)
    assert step not in set(steps["step"]) and steps["test/acc"].notna().all()
    assert set(steps["status"]) == {"ok"}


# --------------------------------------------------------------------------------------
# Checkpoints


def _phases(d):
    return pd.read_csv(d / "analysis" / "phases.csv").iloc[0]


def test_missing_phase_checkpoint_is_read_at_one_neighbour_everywhere(run_dir, capfd):
    grok = int(_phases(run_dir)["grok_step"])
    shutil.rmtree(run_dir / "checkpoints" / "params" / str(grok))
    code, err = _spectra(capfd, run_dir, *FAST, "--no-figures")
    assert code == 0
    _only(err, "warning", "no checkpoint or monitor record for 1 evaluated step(s)", f"({grok})", "status no_checkpoint")
    out = run_dir / "analysis"
    ph = _phases(run_dir)
    used = int(ph["grok_ckpt"])
    assert ph["grok_step"] == grok and used != grok
    note = f"{grok:,} (read at {used:,}: no analysed checkpoint at {grok:,})"
    assert note in (out / "summary.txt").read_text()
    assert note in (out / "report.md").read_text()
    layers = pd.read_csv(out / "all_layers.csv").set_index(["step", "layer"])
    t1 = pd.read_csv(out / "table1_alpha.csv")
    row = t1[(t1["layer"] == "fc1") & (t1["phase"] == "grok") & (t1["metric"] == "alpha")].iloc[0]
    assert row["mean"] == pytest.approx(layers.loc[(used, "fc1"), "alpha"])
    t4 = pd.read_csv(out / "table4_mp_fc1.csv")
    row = t4[(t4["metric"] == "rand_sigma_mp") & (t4["phase"] == "grok")].iloc[0]
    assert str(row["steps_used"]) == str(used)
    assert row["mean"] == pytest.approx(layers.loc[(used, "fc1"), "rand_sigma_mp"])
    alpha = f"α {layers.loc[(used, 'fc1'), 'alpha']:.2f}/{layers.loc[(used, 'fc2'), 'alpha']:.2f}"
    assert f"grok: {alpha}" in (out / "summary.txt").read_text()
    steps = _steps_table(run_dir).set_index("step")
    assert steps.loc[grok, "status"] == "no_checkpoint"


def test_truncated_checkpoint_is_skipped_without_tracebacks(run_dir, capfd):
    step = 147
    _truncate_checkpoint(run_dir, step)
    out = run_dir / "analysis"
    before = _snapshot(out)
    code, err = _spectra(capfd, run_dir, *FAST, "--no-figures", "--strict")
    assert code == 2
    _only(err, "error", f"unreadable params checkpoint {run_dir.absolute()}/checkpoints/params/{step}", "OUT_OF_RANGE")
    assert _snapshot(out) == before  # neither the outputs nor the cache changed

    code, err = _spectra(capfd, run_dir, "--engine", "native", "--workers", "2", "--no-progress", "--no-figures",
                         "--rerun")
    assert code == 0
    _only(err, "warning", f"checkpoints/params/{step}", f"step {step} skipped")
    steps = _steps_table(run_dir).set_index("step")
    assert steps.loc[step, "status"] == "unreadable" and steps.loc[step, "test/acc"] > 0


def test_empty_checkpoint_directory(run_dir, capfd):
    step_dir = run_dir / "checkpoints" / "params" / "72"
    shutil.rmtree(step_dir)
    step_dir.mkdir()
    out = run_dir / "analysis"
    before = _snapshot(out)
    code, err = _spectra(capfd, run_dir, *FAST, "--strict")
    assert code == 2
    _only(err, "error", f"{step_dir}: empty checkpoint directory; step 72 skipped")
    assert _snapshot(out) == before
    code, err = _spectra(capfd, run_dir, *FAST, "--no-figures")
    assert code == 0
    _only(err, "warning", "empty checkpoint directory")
    assert _steps_table(run_dir).set_index("step").loc[72, "status"] == "unreadable"


# --------------------------------------------------------------------------------------
# --out


def test_out_is_a_regular_file(run_dir, tmp_path, capfd):
    target = tmp_path / "out.txt"
    target.write_text("not a folder\n")
    before = _snapshot(run_dir)
    code, err = _spectra(capfd, run_dir, *FAST, "--rerun", "--out", target)
    assert code == 2
    _only(err, "error", f"--out {target} is not a directory")
    assert target.read_text() == "not a folder\n"
    assert _snapshot(run_dir) == before  # --rerun did no work: the cache is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "wd0"]


def test_read_only_out(run_dir, tmp_path, capfd):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "report.md").write_text("previous\n")
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("permission bits do not stop this user (root): see test_full_disk for a failing writer")
        code, err = _spectra(capfd, run_dir, *FAST, "--out", out)
        assert code == 2
        _only(err, "error", f"--out {out} cannot be written")
        assert (out / "report.md").read_text() == "previous\n"
    finally:
        out.chmod(0o755)


def test_full_disk_leaves_the_previous_outputs(run_dir, capfd, monkeypatch):
    out = run_dir / "analysis"
    before = _snapshot(out)
    real = pd.DataFrame.to_csv

    def full_disk(self, path=None, *args, **kwargs):
        if path is not None and "table2_traps" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    code, err = _spectra(capfd, run_dir, *FAST)
    assert code == 2
    _only(err, "error", f"cannot write the outputs for {out} (No space left on device)",
          "the previous outputs are unchanged")
    assert _snapshot(out) == before
    assert not [p for p in run_dir.iterdir() if ".staging-" in p.name]


def test_publish_failure_rolls_back(run_dir, monkeypatch):
    """A rename that fails half-way through publishing puts every previous file back."""
    from grokjax.analysis import outdir

    out = run_dir / "analysis"
    before = _snapshot(out)
    staging = outdir.stage(out)
    for name in ("report.md", "summary.txt", "phases.csv"):
        (staging / name).write_text("new\n")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if str(dst).endswith("summary.txt") and Path(src).parent == staging:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        outdir.publish(staging, out)
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert len(calls) > 3


# --------------------------------------------------------------------------------------
# MNIST


def _idx_dir(folder: Path, mnist, skip=None) -> Path:
    folder.mkdir()
    for k, name in data.IDX_FILES.items():
        if k == skip:
            continue
        a = mnist[k]
        header = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
        (folder / name).write_bytes(header + np.ascontiguousarray(a).tobytes())
    return folder


def test_cache_dir_that_cannot_be_written(tmp_path, mnist, capfd):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be\n")
    idx = _idx_dir(tmp_path / "idx", mnist)
    code = data.main(["--cache-dir", str(blocker), "--idx-dir", str(idx), "--source", "cache", "--source", "idx"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"error: cannot write the MNIST cache {blocker}/"), err
    assert blocker.read_text() == "a file where the cache folder should be\n"
    # Training does not need the cache: a warning, and the verified arrays.
    with pytest.warns(data.DataWarning, match="cannot write the MNIST cache .* used uncached"):
        got = data.load_mnist(blocker, idx, sources=("cache", "idx"), verbose=False)
    assert data.verify(got) == []


def test_cache_with_a_wrong_checksum_is_kept_aside(tmp_path, mnist, capfd):
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = {k: v.copy() for k, v in mnist.items()}
    bad["x_test"][0, 0, 0] ^= 1
    np.savez(cache / data.CACHE_NAME, **bad)
    bad_bytes = (cache / data.CACHE_NAME).read_bytes()
    idx = _idx_dir(tmp_path / "idx", mnist)
    code = data.main(["--cache-dir", str(cache), "--idx-dir", str(idx), "--source", "cache", "--source", "idx"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert code == 0
    assert err[0] == "warning: MNIST from cache does not match the pinned sha256 digests (x_test); not used"
    assert err[1].startswith(f"warning: MNIST: the cache {cache / data.CACHE_NAME} failed verification; "
                             f"kept as {data.CACHE_NAME}.bad")
    assert (cache / f"{data.CACHE_NAME}.bad").read_bytes() == bad_bytes  # nothing existing is lost
    assert data.verify(data.load_mnist(cache, sources=("cache",), verbose=False)) == []


def test_idx_dir_with_one_file_missing(tmp_path, mnist, capfd):
    idx = _idx_dir(tmp_path / "idx", mnist, skip="y_test")
    before = _snapshot(idx)
    cache = tmp_path / "cache"
    code = data.main(["--cache-dir", str(cache), "--idx-dir", str(idx), "--source", "idx"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert code == 1
    missing = f"t10k-labels-idx1-ubyte[.gz] not found in {idx}"
    assert err == [f"error: could not obtain verified MNIST: idx: {missing}"]
    assert not cache.exists() and _snapshot(idx) == before
    # With a verified cache after it, a warning and the cache.
    data.main(["--cache-dir", str(cache), "--idx-dir", str(_idx_dir(tmp_path / "full", mnist)), "--source", "idx"])
    capfd.readouterr()
    code = data.main(["--cache-dir", str(cache), "--idx-dir", str(idx), "--source", "idx", "--source", "cache"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert code == 0 and err == [f"warning: MNIST IDX directory {idx} is unusable ({missing}); trying the next source"]
