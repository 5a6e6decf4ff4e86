"""Run loop and CLI: files written, resume after crashes, refusals, bad input, divergence, progress."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from grokjax import ckpt
from grokjax.train.config import ConfigError, TrainConfig
from grokjax.train.progress import Progress, Throughput, eta_text, progress_line
from grokjax.train.runner import NonFiniteError, run
from grokjax.train.schedule import chunk_lengths, eval_steps
from helpers import CLI_RUN, SMALL, interrupt


def _records(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time/wall"}
            for line in (d / "metrics.jsonl").read_text().splitlines()]


def _final(d, step):
    return ckpt.load_params(d, step)


def _same_params(a, b):
    for layer in a:
        for k in a[layer]:
            np.testing.assert_array_equal(a[layer][k], b[layer][k])


def _chunk_ends(cfg):
    """The step each chunk of a whole run trains up to."""
    out, t = [], 0
    for e in eval_steps(cfg.steps, cfg.log_points_per_decade, cfg.authors_grid):
        for length in chunk_lengths(int(e) - t, cfg.chunk):
            t += length
            out.append(t)
    return out


def _crash_at(step):
    """An `on_chunk` callback: the run crashes when a chunk up to `step` or later is dispatched."""
    def on_chunk(t):
        if t >= step:
            raise RuntimeError(f"simulated crash at step {t}")
    return on_chunk


def test_run_writes_config_metrics_checkpoints(tmp_path, mnist, capsys):
    cfg = TrainConfig(out=str(tmp_path / "r"), **{**SMALL, "progress": True})
    seen = []
    d = run(cfg, mnist=mnist, on_chunk=seen.append)[0]
    assert seen == _chunk_ends(cfg)  # once per chunk, with the step it trains up to
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal: plain lines, no bar
    progress = [line for line in err.splitlines() if line.startswith("r: step ")]
    assert progress and re.fullmatch(r"r: step 120/120 \(100\.0%\) \| \S+ steps/s \| done in \w+ \| test acc 0\.\d{4}",
                                     progress[-1]), err
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["config"]["steps"] == 120 and cfg["config"]["dtype"] == "float64"
    assert "jax" in cfg["versions"] and "platform" in cfg["device"]
    recs = _records(d)
    steps = [r["step"] for r in recs]
    assert steps[0] == 0 and steps[-1] == 120 and steps == sorted(set(steps))
    assert {"train/loss", "train/acc", "test/loss", "test/acc", "params/l2", "params/l2_weights",
            "params/l2_fc3", "schedule/authors"} <= set(recs[0])
    assert ckpt.list_param_steps(d) == steps
    p = _final(d, 120)
    assert p["fc1"]["kernel"].shape == (784, 200) and p["fc1"]["kernel"].dtype == np.float64


def test_resume_after_crash_mid_chunk_is_bitwise_identical(tmp_path, mnist, small_run):
    ref = small_run
    cfg = TrainConfig(out=str(tmp_path / "crash"), **SMALL)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, mnist=mnist, on_chunk=_crash_at(28))
    partial = _records(tmp_path / "crash")
    assert 0 < partial[-1]["step"] < 120
    d = run(cfg, mnist=mnist)[0]
    assert _records(d) == _records(ref)
    _same_params(_final(d, 120), _final(ref, 120))


def test_rerun_of_finished_run_changes_nothing(tmp_path, mnist, small_run):
    d = tmp_path / "r"
    shutil.copytree(small_run, d)  # a finished run of SMALL
    cfg = TrainConfig(out=str(d), **SMALL)
    before = _records(d)
    run(cfg, mnist=mnist)
    assert _records(d) == before


def test_different_config_is_refused_unless_overwrite(tmp_path, mnist, small_run):
    shutil.copytree(small_run, tmp_path / "r")  # a finished run of SMALL
    other = TrainConfig(out=str(tmp_path / "r"), **{**SMALL, "wd": 0.01})
    with pytest.raises(ConfigError, match="different config"):
        run(other, mnist=mnist)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["wd"] == 0.0
    run(TrainConfig(out=str(tmp_path / "r"), overwrite=True, **{**SMALL, "wd": 0.01}), mnist=mnist)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["wd"] == 0.01


def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, mnist):
    cfg = TrainConfig(out=str(tmp_path / "r"), lr=1e300, **SMALL)
    with pytest.raises(NonFiniteError, match="last good checkpoint: step 0"):
        run(cfg, mnist=mnist)
    assert ckpt.list_param_steps(tmp_path / "r") == [0]


def _cli(root, *args, timeout=300, **env_vars):
    env = {**os.environ, "GROKJAX_OFFLINE": "1", **env_vars}
    return subprocess.run([sys.executable, str(root / "experiments" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, msg", [
    (["--steps", "-5"], "steps must be a positive integer"),
    (["--steps", "1.5"], "whole number"),
    (["--steps", "abc"], "integer"),
    (["--wd", "-1"], "wd must be"),
    (["--bogus", "1"], "unrecognized arguments"),
    (["--batch", "300"], "batch must divide"),
])
def test_cli_bad_input_one_line_exit_2(root, tmp_path, args, msg):
    r = _cli(root, *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_out(root, tmp_path):
    (tmp_path / "file").write_text("x")
    r = _cli(root, "--steps", "10", "--out", str(tmp_path / "file" / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_smoke_and_kill_9_resume(root, tmp_path, cli_reference):
    """A real CLI run killed with SIGKILL at a random moment resumes to the same result."""
    run_dir = tmp_path / "killed"
    code, _ = interrupt(root, CLI_RUN, run_dir, n_ckpts=6, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    r = _cli(root, *CLI_RUN, "--out", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "XLA CPU threads" not in r.stderr, r.stderr  # the same pool as the killed segment: nothing said
    assert _records(run_dir) == _records(cli_reference)
    _same_params(_final(run_dir, 400), _final(cli_reference, 400))


def test_xla_cpu_threads_are_recorded_and_a_resume_with_another_count_is_said(root, tmp_path):
    """config.json records the size of XLA's CPU thread pool (PJRT_NPROC sets it; Eigen's GEMM
    blocking, hence the float64 rounding, depends on it). Rerunning with another size says so in
    one line (with the same size it says nothing: the CLI resumes of test_cli_smoke_and_kill_9_resume
    and test_long_runs.py's SIGTERM)."""
    args = ["--steps", "40", "--width", "32", "--log_points_per_decade", "4", "--authors_grid", "false",
            "--chunk", "2", "--progress", "false", "--monitor", "false", "--out", str(tmp_path / "r")]
    r = _cli(root, *args, PJRT_NPROC="3")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["device"]["xla_cpu_threads"] == 3
    r = _cli(root, *args, PJRT_NPROC="1")
    assert r.returncode == 0, r.stderr
    notes = [x for x in r.stderr.splitlines() if "XLA CPU threads" in x]
    assert len(notes) == 1 and "started with 3 XLA CPU threads and resumes with 1" in notes[0], r.stderr
    assert "PJRT_NPROC=3" in notes[0]


def test_overwrite_never_deletes_a_foreign_directory(tmp_path, mnist):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ConfigError, match="holds no config.json"):
        run(TrainConfig(out=str(tmp_path), overwrite=True, **SMALL), mnist=mnist)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_truncated_latest_full_state_falls_back_to_previous(tmp_path, mnist, small_run):
    d = tmp_path / "r"
    shutil.copytree(small_run, d)  # a finished run of SMALL
    cfg = TrainConfig(out=str(d), **SMALL)
    before = _records(d)
    final = _final(d, 120)
    states = sorted(int(p.name) for p in (d / "checkpoints" / "state").iterdir() if p.name.isdigit())
    assert states[-1] == 120 and len(states) == 2
    for f in (d / "checkpoints" / "state" / "120").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # a torn write
    with pytest.warns(UserWarning, match="unreadable"):
        run(cfg, mnist=mnist)
    assert _records(d) == before
    _same_params(_final(d, 120), final)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn state was replaced by a good one
        run(cfg, mnist=mnist)


def test_progress_line_format():
    acc = "test acc 0.8123 a1 3.41 a2 2.95 traps 0/1"
    assert progress_line("r", 40_960, 10_000_000, 1234.4, acc) == \
        f"r: step 40,960/10,000,000 (0.4%) | 1,234 steps/s | ETA 2h14m | {acc}"
    assert progress_line("seed0", 16, 120, None) == "seed0: step 16/120 (13.3%) | - steps/s | ETA -"
    assert progress_line("r", 120, 120, 24.0, end="done in 5s") == "r: step 120/120 (100.0%) | 24 steps/s | done in 5s"


def test_rate_and_eta_leave_out_the_compile_chunk():
    tp = Throughput()
    assert tp.rate is None and eta_text(0, 10_116, tp.rate) == "ETA -"
    tp.compiled()
    tp.mark(240.0, 16)  # the first chunk: 16 steps after four minutes of compilation
    assert tp.rate is None and eta_text(16, 10_116, tp.rate) == "ETA -"
    tp.mark(241.0, 116)  # then 100 steps a second
    assert tp.rate == 100.0 and eta_text(116, 10_116, tp.rate) == "ETA 1m40s"  # not 116 steps / 241 s: 5h50m
    tp.compiled()
    tp.mark(300.0, 132)  # a chunk of a new length compiles: left out as well
    tp.mark(302.0, 332)
    assert tp.rate == 100.0


def test_rate_follows_the_recent_chunks():
    tp = Throughput(window=10)
    for now, step in [(0, 0), (10, 100), (11, 200)]:
        tp.mark(now, step)
    assert tp.rate == pytest.approx(200 / 11)
    tp.mark(21, 1200)  # the intervals before the last 10 s drop out
    assert tp.rate == pytest.approx(100.0)


def _drive(stream, *, enabled=True):
    """Ten chunks of 100 steps, 10 s each after a first one of 60 s that compiles; a postfix after the fifth."""
    now = [0.0]
    p = Progress(1000, 0, "r", enabled=enabled, stream=stream, clock=lambda: now[0], every=30)
    p.compiled()
    for k in range(1, 11):
        now[0] += 60 if k == 1 else 10
        p.update(100)
        if k == 5:
            p.set_postfix("test acc 0.5000")
    p.close("done")
    return stream.getvalue()


def test_progress_off_a_terminal_prints_a_line_every_interval():
    assert _drive(io.StringIO()).splitlines() == [
        "r: step 100/1,000 (10.0%) | - steps/s | ETA -",
        "r: step 400/1,000 (40.0%) | 10 steps/s | ETA 1m00s",
        "r: step 700/1,000 (70.0%) | 10 steps/s | ETA 30s | test acc 0.5000",
        "r: step 1,000/1,000 (100.0%) | 10 steps/s | ETA 0s | test acc 0.5000",
        "r: step 1,000/1,000 (100.0%) | 10 steps/s | done in 2m30s | test acc 0.5000",
    ]
    assert _drive(io.StringIO(), enabled=False) == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar_with_the_same_eta():
    out = _drive(_Terminal())
    assert "\r" in out and "r: 100%|" in out
    final = out.split("\r")[-1]
    assert "1000/1000" in final and "10 steps/s, ETA 0s, test acc 0.5000" in final
