"""Long runs: time-limited and signalled pauses, resume messages, export and continue elsewhere."""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from grokjax import ckpt

from grokjax.train import engine, stops
from grokjax.train.config import ConfigError, TrainConfig, parse_duration
from grokjax.train.export import export_run, params_at_steps
from grokjax.train.runner import Paused, run
from helpers import CLI_RUN, SMALL, interrupt


def _records(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time/wall"}
            for line in (d / "metrics.jsonl").read_text().splitlines()]


def _same_params(a, b):
    for layer in a:
        for k in a[layer]:
            np.testing.assert_array_equal(a[layer][k], b[layer][k])


def _events(d):
    return [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]


def _segments_script():
    spec = importlib.util.spec_from_file_location("segments", Path(__file__).parents[1] / "experiments" / "segments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference(small_run):
    return small_run


def _mid_segment_checks(cfg, skip=0):
    """(check number, step) of stop checks that fall strictly between two evaluation steps."""
    from grokjax.train.schedule import chunk_lengths, eval_steps

    out, n, t = [], 0, 0
    evals = [int(e) for e in eval_steps(cfg.steps, cfg.log_points_per_decade, cfg.authors_grid)]
    for e in evals:
        for length in chunk_lengths(e - t, cfg.chunk):
            n += 1
            if t not in evals:
                out.append((n, t))
            t += length
    return out[skip:]


@contextlib.contextmanager
def _compilations():
    """Counts the block's requests for compiled programs (`requested`) and those the persistent
    compilation cache answered (`found`; conftest: one cache a session, so a program some run of
    the session compiled is found)."""
    import jax

    assert jax.config.jax_compilation_cache_dir, "these checks need the session's compilation cache"
    got, on = {"requested": 0, "found": 0}, [True]
    names = {"/jax/compilation_cache/compile_requests_use_cache": "requested",
             "/jax/compilation_cache/cache_hits": "found"}

    def listen(event, **kw):
        if on[0] and event in names:
            got[names[event]] += 1

    jax.monitoring.register_event_listener(listen)
    try:
        yield got
    finally:
        on[0] = False  # JAX has no public way to unregister a listener


def _stop_after(monkeypatch, n_checks, reason="time limit"):
    """Makes the run pause at its n-th stop check (one check per chunk dispatched)."""
    calls = {"n": 0}

    def should_stop(self):
        calls["n"] += 1
        if calls["n"] >= n_checks:
            self.reason = reason
        return self.reason

    monkeypatch.setattr(stops.StopRequest, "should_stop", should_stop)


@pytest.mark.parametrize("text, seconds", [("2h30m", 9000), ("150m", 9000), ("90s", 90), ("5400", 5400),
                                           ("1h", 3600), ("1.5h", 5400), ("2m30s", 150)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "2x", "h", "inf", "nan"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="time limit"):
        parse_duration(text)


def test_pause_between_evaluations_then_resume_is_bitwise_identical(tmp_path, mnist, monkeypatch, capsys, reference):
    cfg = TrainConfig(out=str(tmp_path / "r"), **SMALL)
    n, expected = _mid_segment_checks(cfg)[0]
    _stop_after(monkeypatch, n)
    with pytest.raises(Paused) as info:
        run(cfg, mnist=mnist)
    step = info.value.step
    evals = [r["step"] for r in _records(reference)]
    assert step == expected and 0 < step < 120 and step not in evals
    assert f"paused at step {step} of 120" in str(info.value) and "rerun the same command" in str(info.value)
    d = tmp_path / "r"
    assert ckpt.list_state_steps(d)[-1] == step  # a full state at the pause step itself
    assert _events(d)[-1]["event"] == "pause" and _events(d)[-1]["step"] == step
    monkeypatch.undo()
    capsys.readouterr()
    init_params, drawn = engine.init_params, []

    def watched(key, *args, **kw):  # the restore's template traces it (jax.eval_shape): abstract keys only
        drawn.append(not isinstance(key, jax.core.Tracer))
        return init_params(key, *args, **kw)

    monkeypatch.setattr(engine, "init_params", watched)
    with _compilations() as compiled:
        run(cfg, mnist=mnist)
    monkeypatch.undo()
    assert drawn and not any(drawn), drawn  # a resume initializes nothing
    err = capsys.readouterr().err
    assert f"resuming {d} from step {step} of 120 (paused by time limit" in err
    assert _records(d) == _records(reference)
    # the resume calls the programs of a fresh run (the reference's): it compiles none of its own
    assert compiled["requested"] > 0 and compiled["found"] == compiled["requested"], compiled
    _same_params(ckpt.load_params(d, 120), ckpt.load_params(reference, 120))


def test_several_pauses_of_a_sweep_resume_identically(tmp_path, mnist, monkeypatch):
    """A 2 x 2 sweep (seeds x weight decays, keep_params=log) paused three times by SIGTERM and
    resumed: every replica bitwise as the uninterrupted sweep, every segment's machine recorded."""
    kw = dict(SMALL, steps=60, log_points_per_decade=2, keep_params="log")  # 6 evaluations of 4 replicas
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **kw), seeds=[0, 1], wds=[0.0, 0.01], mnist=mnist)
    cfg = TrainConfig(out=str(tmp_path / "r"), **kw)
    for n in (3, 4, 7):
        _stop_after(monkeypatch, n, reason="SIGTERM")
        with pytest.raises(Paused):
            run(cfg, seeds=[0, 1], wds=[0.0, 0.01], mnist=mnist)
        monkeypatch.undo()
    got = run(cfg, seeds=[0, 1], wds=[0.0, 0.01], mnist=mnist)
    assert [d.name for d in got] == ["wd0_seed0", "wd0_seed1", "wd0.01_seed0", "wd0.01_seed1"]
    for a, b in zip(got, ref, strict=True):
        assert _records(a) == _records(b)
        assert ckpt.list_param_steps(a) == ckpt.list_param_steps(b)
        _same_params(ckpt.load_params(a, 60), ckpt.load_params(b, 60))
        events = _events(a)
        assert [e["event"] for e in events] == ["start"] + ["pause", "resume"] * 3 + ["end"]
        # every segment says which machine it ran on (a resume elsewhere drifts in the low bits)
        for e in events:
            if e["event"] in ("start", "resume"):
                assert e["cpu"] and e["host"] and "xla_cpu_threads" in e, e
        # experiments/segments.py: four contiguous segments, each with its wall time and machine
        segs = _segments_script().segments(a)
        pauses = [e["step"] for e in events if e["event"] == "pause"]
        assert [(s["start"], s["end"]) for s in segs] == list(zip([0, *pauses], [*pauses, 60], strict=True))
        assert [s["ended"] for s in segs] == ["paused (SIGTERM)"] * 3 + ["reached the final step"]
        assert all(s["wall_s"] is not None and s["cpu"] == events[0]["cpu"] for s in segs), segs


def test_rerun_of_complete_run_says_so_and_touches_nothing(tmp_path, mnist, capsys, reference):
    d = tmp_path / "r"
    shutil.copytree(reference, d)  # a complete run of SMALL
    cfg = TrainConfig(out=str(d), **SMALL)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    capsys.readouterr()
    run(cfg, mnist=mnist)
    assert f"already complete: {d} (120 steps)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_corrupt_metrics_in_the_middle_is_refused_untouched(tmp_path, mnist, reference):
    d = tmp_path / "r"
    shutil.copytree(reference, d)  # a complete run of SMALL
    cfg = TrainConfig(out=str(d), **SMALL)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (d / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="line 4 is corrupt"):
        run(cfg, mnist=mnist)
    assert (d / "metrics.jsonl").read_bytes() == before


def test_export_mid_run_and_continue_elsewhere(tmp_path, mnist, monkeypatch, reference):
    cfg = TrainConfig(out=str(tmp_path / "r"), **SMALL)
    _stop_after(monkeypatch, _mid_segment_checks(cfg, skip=1)[0][0])
    with pytest.raises(Paused) as info:
        run(cfg, mnist=mnist)
    monkeypatch.undo()
    out = export_run(tmp_path / "r", tmp_path / "exported", params_per_decade=2)
    assert ckpt.list_state_steps(out) == [info.value.step]
    assert json.loads((out / "config.json").read_text())["config"]["out"] == str(tmp_path / "exported")
    for f in out.rglob("*"):  # nothing names the source run's directory
        if f.is_file() and f.suffix in ("", ".txt", ".json", ".jsonl"):
            assert str(tmp_path / "r") + "/" not in f.read_text(errors="ignore") + "/", f
    kept = ckpt.list_param_steps(out)
    assert 0 < len(kept) < len(ckpt.list_param_steps(tmp_path / "r")) and kept[0] == 0
    run(TrainConfig(out=str(out), **SMALL), mnist=mnist)
    assert _records(out) == _records(reference)
    _same_params(ckpt.load_params(out, 120), ckpt.load_params(reference, 120))


def test_export_refuses_bad_input_and_touches_nothing(tmp_path, reference):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        export_run(reference, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "keep"
    (tmp_path / "norun").mkdir()
    with pytest.raises(ConfigError, match="holds no run"):
        export_run(tmp_path / "norun", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_params_at_phases_and_steps(tmp_path, reference):
    rows = [r for r in _records(reference) if "test/acc" in r]
    peak = max(rows, key=lambda r: (r["test/acc"], -r["step"]))["step"]
    kept = ckpt.list_param_steps(reference)
    chosen, missing = params_at_steps(reference, ["phases", 50])
    assert set(chosen) <= set(kept) and missing == {}
    where = {label: s for s, labels in chosen.items() for label in labels.split("+")}
    assert where["grok"] == min(kept, key=lambda s: abs(np.log1p(s) - np.log1p(peak)))
    assert where["final"] == rows[-1]["step"] == kept[-1]
    assert where["50"] == min(kept, key=lambda s: abs(np.log1p(s) - np.log1p(50)))
    out = export_run(reference, tmp_path / "e", params_at=chosen)
    assert ckpt.list_param_steps(out) == sorted(chosen)
    for s in chosen:
        _same_params(ckpt.load_params(out, s), ckpt.load_params(reference, s))
    # a step the run did not keep: refused, nothing written
    absent = next(s for s in range(1, 120) if s not in kept)
    with pytest.raises(ConfigError, match=f"kept no params checkpoint at step\\(s\\) {absent}"):
        export_run(reference, tmp_path / "x", params_at=[absent])
    assert not (tmp_path / "x").exists()


def test_cli_export_params_at_warns_of_phase_steps_it_lacks(root, tmp_path, reference):
    """A run continued from an export keeps no params before it: the export says which steps it
    could not carry, and carries the rest."""
    d = tmp_path / "r"
    shutil.copytree(reference, d)
    kept = ckpt.list_param_steps(d)
    for s in kept[:-2]:
        shutil.rmtree(d / ckpt.PARAMS_DIR / str(s))
    r = _cli(root, "--export", str(d), str(tmp_path / "e"), "--export_params_at", "4,phases")
    assert r.returncode == 0, r.stderr
    assert "WARNING: no params checkpoint within 0.15 decade of 4 (4): none exported for it" in r.stderr
    assert f"params checkpoints exported at {kept[-1]:,} (" in r.stderr
    assert ckpt.list_param_steps(tmp_path / "e") and set(ckpt.list_param_steps(tmp_path / "e")) <= set(kept[-2:])
    for args, msg in [(["--export_params_at", "peak"], "expected"), (["--export_params_at", "1e6"], "go with --export")]:
        r = _cli(root, *args, "--out", str(tmp_path / "y"))
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert not (tmp_path / "y").exists()


def _cli(root, *args, timeout=300):
    env = {**os.environ, "GROKJAX_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(root / "experiments" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, msg", [
    (["--time_limit", "soon"], "time limit must look like"),
    (["--steps", "1e30"], "steps must be at most"),
    (["--keep_params", "some"], "keep_params must be one of"),
])
def test_cli_bad_long_run_flags(root, tmp_path, args, msg):
    r = _cli(root, *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_export_bad_input(root, tmp_path):
    (tmp_path / "norun").mkdir()
    r = _cli(root, "--export", str(tmp_path / "norun"), str(tmp_path / "x"))
    assert r.returncode == 2 and "holds no run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_sigterm_pauses_with_code_75_and_resumes_identically(root, tmp_path, cli_reference):
    d = tmp_path / "r"
    code, err = interrupt(root, CLI_RUN, d, n_ckpts=6, sig=signal.SIGTERM)
    assert code == 75, err
    assert "paused at step" in err and "rerun the same command to continue" in err
    r = _cli(root, *CLI_RUN, "--out", str(d))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "paused by SIGTERM" in r.stderr
    assert "XLA CPU threads" not in r.stderr, r.stderr  # the same pool as the paused segment: nothing said
    assert _records(d) == _records(cli_reference)
    _same_params(ckpt.load_params(d, 400), ckpt.load_params(cli_reference, 400))


def test_cli_time_limit_pauses_with_code_75(root, tmp_path):
    d = tmp_path / "r"
    r = _cli(root, *CLI_RUN[:1], "200000", *CLI_RUN[2:], "--time_limit", "4s", "--out", str(d))
    assert r.returncode == 75, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("paused at step")]
    assert len(line) == 1 and "of 200000 after" in line[0] and "time limit" in line[0]
    step = int(line[0].split()[3])
    assert ckpt.list_state_steps(d)[-1] == step


@pytest.mark.parametrize("value, msg", [("-0.1,0", "finite numbers >= 0"), ("0,x", "comma-separated weight decays"),
                                        ("0.01,0.01", "distinct")])
def test_cli_bad_wds(root, tmp_path, value, msg):
    r = _cli(root, f"--wds={value}", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_sigterm_before_the_first_chunk_pauses_at_the_start(root, tmp_path):
    """A SIGTERM as soon as the CLI's handler is in place (a test-only hook), before the run
    has restored, compiled or trained anything: paused at the step it started from, exit 75."""
    d = tmp_path / "r"
    env = {**os.environ, "GROKJAX_OFFLINE": "1", "GROKJAX_TEST_SIGNAL_AT": "start"}
    r = subprocess.run([sys.executable, str(root / "experiments" / "run.py"), *CLI_RUN, "--out", str(d)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 75, r.stderr
    assert "paused at step 0 of 400" in r.stderr and "(SIGTERM)" in r.stderr, r.stderr
    assert ckpt.list_state_steps(d) == [0]
    events = [json.loads(line)["event"] for line in (d / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "pause"]
