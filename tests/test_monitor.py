"""The in-loop HTSR monitor: its records equal the analysis of the checkpoints, backfill, live warning."""

import json
import math
import sys

import numpy as np
import pytest

from grokjax.analysis import htsr, meanaware, monitor, pipeline, progress

from grokjax import ckpt, rundir
from grokjax.train.config import TrainConfig
from grokjax.analysis.monitor import LiveWarning
from grokjax.train.runner import run

from helpers import RUN300 as SMALL


def _rows(alpha1, traps2):
    return [{"layer": "fc1", "alpha": alpha1, "traps": 0}, {"layer": "fc2", "alpha": 5.0, "traps": traps2}]


def test_live_warning_fires_once_on_a_persistent_signal_after_the_peak():
    w = LiveWarning()
    fired = []
    acc = [0.1, 0.5, 0.8, 0.79, 0.78, 0.77, 0.76, 0.75, 0.74, 0.73]
    traps = [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # a trap before the peak does not count
    for i, (a, t) in enumerate(zip(acc, traps)):
        fired += w.update(10 * i, a, _rows(3.0, t))
    assert len(fired) == 1
    f = fired[0]
    assert (f["layer"], f["signal"], f["onset"], f["step"]) == ("fc2", "traps>0", 30, 50)


def test_live_warning_ignores_blips_and_restarts_at_a_new_peak():
    w = LiveWarning()
    fired = []
    # alpha < 2 twice, a blip, twice more, then a new best test accuracy, then twice: never 3 in a row
    alphas = [3, 1.9, 1.8, 3, 1.9, 1.8, 1.7, 1.9, 1.8, 3]
    acc = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9]
    for i, (a, t) in enumerate(zip(alphas, acc)):
        fired += w.update(i, t, _rows(a, 0))
    assert fired == []
    w2 = LiveWarning()
    out = [w2.update(i, 0.5, _rows(1.5 if i >= 2 else 3.0, 0)) for i in range(8)]
    assert [len(o) for o in out] == [0, 0, 0, 0, 1, 0, 0, 0]  # fires once, at the third, never again
    assert out[4][0]["signal"] == "alpha<2" and out[4][0]["layer"] == "fc1" and out[4][0]["onset"] == 2


def test_live_warning_nan_is_no_signal():
    w = LiveWarning()
    fired = []
    for i in range(6):
        fired += w.update(i, 0.5, _rows(math.nan, 0))
    assert fired == []


@pytest.fixture(scope="module")
def monitored(run300):
    return run300  # helpers.RUN300 (SMALL here), shared with test_ablation


def test_monitor_records_equal_the_analysis_of_each_checkpoint(monitored, mnist):
    recs = rundir.read_records(monitored)
    metrics = [json.loads(x)["step"] for x in (monitored / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == metrics
    inputs = progress.load_inputs(100, 0, 0, mnist=mnist)
    for r in recs[-3:]:
        with htsr.blas_thread_limit(1):  # as the record process and the analysis' workers compute
            layers, measures = pipeline.analyze_checkpoint(ckpt.load_params(monitored, r["step"]), step=r["step"],
                                                          run_seed=0, options=monitor.monitor_options(), inputs=inputs)
        assert len(layers) == 3 and {x["layer"] for x in layers} == {"fc1", "fc2", "fc3"}
        for got, want in zip(r["layers"], layers):
            for k, v in want.items():
                if isinstance(v, float) and math.isnan(v):
                    assert math.isnan(got[k]), k
                else:
                    assert got[k] == v, k
        for k, v in measures.items():
            if not k.startswith("time/"):
                assert r["measures"][k] == v, k
        assert "traps_k_mean" in r["layers"][1] and "alpha_centred" in r["layers"][1]
        spec = rundir.read_spectra(monitored, r["step"])
        W = ckpt.load_params(monitored, r["step"])["fc2"]["kernel"]
        np.testing.assert_allclose(spec["fc2"]["esd"], np.linalg.svd(W, compute_uv=False)[::-1] ** 2, rtol=1e-10)
        assert spec["fc1"]["rand"].shape == (200,) and spec["fc3"]["rand"].shape == (50,)
        # the spectra come from the K-shuffle pass; they are the trap count's, bit for bit
        weights = pipeline.weights_of(ckpt.load_params(monitored, r["step"]))
        drawn = htsr.shuffle_spectra(weights, pipeline.checkpoint_seed(0, r["step"]))
        for name in weights:
            assert np.array_equal(spec[name]["rand"], drawn[name]["evals"]), name


def test_compute_record_spectra_without_the_k_shuffle_pass(monkeypatch, mnist):
    """A failed K-shuffle pass still leaves the trap count's spectra in the record."""
    rng = np.random.default_rng(3)
    params = {k: {"kernel": rng.normal(size=s), "bias": np.zeros(s[1])}
              for k, s in (("fc1", (784, 200)), ("fc2", (200, 200)), ("fc3", (200, 10)))}
    inputs = progress.load_inputs(100, 0, 0, mnist=mnist)
    rec, spectra = monitor.compute_record(params, step=7, run_seed=0, inputs=inputs)
    monkeypatch.setattr(meanaware, "extended_weights", lambda *a, **k: (_ for _ in ()).throw(ValueError("planted")))
    rec2, spectra2 = monitor.compute_record(params, step=7, run_seed=0, inputs=inputs)
    assert all("extended_error" in r for r in rec2["layers"])
    assert spectra.keys() == spectra2.keys()
    for k in spectra:
        assert np.array_equal(spectra[k], spectra2[k]), k


def test_records_are_computed_in_a_niced_process():
    import os

    assert monitor._WORKER.call("pid") != os.getpid()
    assert monitor._WORKER.call("priority") >= monitor.MONITOR_NICE
    with pytest.raises(RuntimeError, match="unknown request"):
        monitor._WORKER.call("nonsense")


def test_record_process_serves_and_forgets_inputs(monkeypatch):
    import io
    import pickle

    from grokjax.analysis import record_worker

    calls = []
    monkeypatch.setattr(monitor, "compute_record", lambda params, **kw: calls.append(kw["inputs"]) or ("r", "s"))
    monkeypatch.setattr(record_worker, "INPUTS_KEPT", 2)
    requests = [("record", ({}, 1, 0, "a", {"x": "A"})), ("record", ({}, 2, 0, "a", None)),
                ("record", ({}, 3, 0, "b", {"x": "B"})), ("record", ({}, 4, 0, "c", {"x": "C"})),
                ("record", ({}, 5, 0, "a", None)), ("bad", ())]
    inp, out = io.BytesIO(b"".join(pickle.dumps(r) for r in requests)), io.BytesIO()
    stdout = sys.stdout
    try:
        assert record_worker.serve(0, inp, out) == 0
    finally:
        sys.stdout = stdout
    out.seek(0)
    replies = [pickle.load(out) for _ in requests]
    assert replies[:5] == [("ok", ("r", "s"))] * 4 + [("ok", None)]  # "a" was let go after "b" and "c"
    assert replies[5][0] == "error" and "unknown request" in replies[5][1]
    assert calls == [{"x": "A"}, {"x": "A"}, {"x": "B"}, {"x": "C"}]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_record_process_ends_with_the_trainer(tmp_path):
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "no_guard.py"  # a script without a __main__ guard
    script.write_text("import time\nfrom grokjax.analysis import monitor\n"
                      "print(monitor._WORKER.call('pid'), flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        p.send_signal(signal.SIGKILL)
        p.wait()
        def alive(pid):  # a zombie (ended, not yet reaped by whoever adopted it) counts as ended
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False
            except OSError:
                return True

        for _ in range(200):
            if not alive(child):
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the record process outlived the trainer")
    finally:
        p.kill()
        p.wait()


def test_backfill_of_a_run_trained_without_the_monitor(tmp_path, mnist, monitored):
    d = run(TrainConfig(out=str(tmp_path / "r"), monitor=False, **SMALL), mnist=mnist)[0]
    assert not rundir.records_path(d).exists()
    assert monitor.main([str(d)]) == 0
    got, want = rundir.read_records(d), rundir.read_records(monitored)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    strip = lambda rec: json.dumps({**rec, "measures": {k: v for k, v in rec["measures"].items()  # noqa: E731
                                                          if not k.startswith("time/")},
                                    "layers": [{k: v for k, v in x.items() if not k.startswith("time")}
                                               for x in rec["layers"]]}, sort_keys=True)
    assert [strip(r) for r in got] == [strip(r) for r in want]


def test_monitor_cli_bad_input(tmp_path, capsys):
    assert monitor.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"grokjax-monitor: error: {tmp_path} holds no run (no config.json)\n"
    (tmp_path / "config.json").write_text('{"config": {"seed": 0}')
    assert monitor.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grokjax-monitor: error: ") and "config.json: not valid JSON" in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text('{"config": {"seed": 0, "data_seed": 0}}')
    assert monitor.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"grokjax-monitor: error: {tmp_path / 'config.json'}: no integer n_per_class\n"
    with pytest.raises(SystemExit) as e:
        monitor.main([])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("grokjax-monitor: error: ")


def _table(d, use_monitor, paper_text=False):
    from grokjax.analysis.pipeline import AnalysisOptions, analyze_run
    from grokjax.analysis.progress import ProgressOptions

    opts = AnalysisOptions(engine="native", workers=1, progress_bar=False, write=False, reuse=False,
                           use_monitor=use_monitor, progress=ProgressOptions(paper_text=paper_text))
    layers, steps = analyze_run(d, opts)
    drop = lambda df: df[[c for c in df.columns if "time" not in c]].sort_index(axis=1)  # noqa: E731
    return drop(layers), drop(steps)


def test_analysis_from_the_record_equals_the_analysis_of_the_checkpoints(monitored, tmp_path):
    import shutil

    import pandas as pd

    from_record = _table(monitored, True)
    from_ckpts = _table(monitored, False)
    for a, b in zip(from_record, from_ckpts):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)
    # without any params checkpoint: the same tables, and the report with its figures
    bare = tmp_path / "bare"
    shutil.copytree(monitored, bare, ignore=shutil.ignore_patterns("analysis"))
    shutil.rmtree(bare / "checkpoints" / "params")
    for a, b in zip(_table(bare, True), from_ckpts):
        a = a.drop(columns=[c for c in ("run",) if c in a.columns]).reset_index(drop=True)
        b = b.drop(columns=[c for c in ("run",) if c in b.columns]).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    from grokjax.analysis import cli

    assert cli.main([str(bare), "--engine", "native", "--workers", "1"]) == 0
    figs = sorted(p.name for p in (bare / "analysis" / "figures").glob("*.png"))
    assert any(n.startswith("fig3") for n in figs) and any(n.startswith("fig2") for n in figs)


def test_paper_text_takes_the_record_rows_and_recomputes_only_the_measures(monitored, monkeypatch):
    import pandas as pd

    calls = []
    real = pipeline._run_tasks
    monkeypatch.setattr(pipeline, "_run_tasks", lambda run, tasks, *a: calls.append(tasks) or real(run, tasks, *a))
    from_record = _table(monitored, True, paper_text=True)
    assert calls[-1] and all(engines == () and need_progress for _, engines, need_progress in calls[-1])
    from_ckpts = _table(monitored, False, paper_text=True)
    assert all(engines == ("native",) for _, engines, _ in calls[-1])
    for a, b in zip(from_record, from_ckpts):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)
    default = _table(monitored, True)[1]
    assert not np.allclose(default["progress/circuit"], from_record[1]["progress/circuit"])  # it is the variant


def test_params_are_read_in_the_record_process(small_run):
    """A backfill reads its checkpoint in the record process (a plain single-process read), and
    gets exactly what a direct read gives; a missing one is a one-line error there."""
    from grokjax.analysis import monitor

    step = ckpt.list_param_steps(small_run)[-1]
    got = monitor._WORKER.call("params", str(small_run), step)
    want = ckpt.load_params(small_run, step)
    assert got.keys() == want.keys()
    for layer in want:
        for k in want[layer]:
            assert np.array_equal(got[layer][k], want[layer][k])
    with pytest.raises(RuntimeError, match="CheckpointError: no params checkpoint"):
        monitor._WORKER.call("params", str(small_run), 10**9)
