"""The run-directory layer: atomic writes, the JSON-lines readers, config.json, and the
separation of the two halves of the package."""

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from grokjax import rundir
from grokjax.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_config_keys_are_the_trainconfig_fields():
    assert tuple(f.name for f in dataclasses.fields(TrainConfig)) == rundir.CONFIG_KEYS


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_analysis_never_imports_the_training_half():
    offenders = {}
    for f in sorted((ROOT / "grokjax" / "analysis").glob("*.py")):
        bad = sorted(m for m in _imports(f) if m == "grokjax.train" or m.startswith("grokjax.train."))
        if bad:
            offenders[f.name] = bad
    assert offenders == {}


def test_shared_layer_imports_neither_half():
    for name in ("rundir.py", "ckpt.py", "data.py", "cliutil.py"):
        mods = _imports(ROOT / "grokjax" / name)
        assert not [m for m in mods if m.startswith(("grokjax.train", "grokjax.analysis", "grokjax.bench"))], name


def test_atomic_write_text_replaces_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("old")
    rundir.atomic_write_text(f, "new")
    assert f.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    f = tmp_path / "s.npz"
    np.savez(f, x=np.arange(3))

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        rundir.atomic_write(f, fail)
    with np.load(f) as z:
        assert z["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_read_jsonl_skips_a_torn_last_line_and_refuses_a_damaged_middle(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0}\n{"step": 5}\n{"step": 1')
    assert [r["step"] for r in rundir.read_jsonl(f)] == [0, 5]
    assert [r["step"] for r in rundir.read_jsonl(f, before_step=5)] == [0]
    f.write_text('{"step": 0}\nnot json\n{"step": 5}\n')
    with pytest.raises(rundir.RunDirError, match=r"metrics.jsonl line 2 is corrupt"):
        rundir.read_jsonl(f)
    assert rundir.read_jsonl(tmp_path / "absent.jsonl") == []


def test_truncate_metrics_keeps_earlier_steps(tmp_path):
    (tmp_path / rundir.METRICS_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 10, 20)))
    kept = rundir.truncate_metrics(tmp_path, 20)
    assert [r["step"] for r in kept] == [0, 10]
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [0, 10]


@pytest.mark.parametrize("text,match", [
    (None, "missing"),
    ("{", "not valid JSON"),
    ('{"x": 1}', "no 'config' object"),
    ('{"config": {}, "format": 2}', "format 2 is newer"),
])
def test_read_config_errors_are_one_line(tmp_path, text, match):
    if text is not None:
        (tmp_path / rundir.CONFIG_FILE).write_text(text)
    with pytest.raises(rundir.RunDirError, match=match) as e:
        rundir.read_config(tmp_path)
    assert "\n" not in str(e.value)


def test_monitor_records_and_spectra_round_trip(tmp_path):
    (tmp_path / rundir.MONITOR_DIR).mkdir()
    rundir.append_jsonl(rundir.records_path(tmp_path), {"step": 7, "layers": []})
    rundir.append_jsonl(rundir.records_path(tmp_path), {"step": 3, "layers": []})
    assert [r["step"] for r in rundir.read_records(tmp_path)] == [3, 7]
    rundir.write_spectra(tmp_path, 7, {"fc1/esd": np.arange(4.0), "fc1/rand": np.ones(2)})
    got = rundir.read_spectra(tmp_path, 7)
    assert got["fc1"]["esd"].tolist() == [0, 1, 2, 3] and got["fc1"]["rand"].tolist() == [1, 1]
