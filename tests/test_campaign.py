"""experiments/campaign.sh: the campaigns it knows, the cores it uses, its errors (no training here:
the slots are given no time, and the status reads a metrics file written by the test)."""

import json
import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "campaign.sh"


def _run(args, tmp_path, **env):
    e = {**os.environ, "GROKJAX_RUNS": str(tmp_path / "runs"), "GROKJAX_EXPORTS": str(tmp_path / "exports"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=e, capture_output=True, text=True, timeout=120)


def test_an_unknown_campaign_or_a_missing_time_is_refused(tmp_path):
    r = _run(["status"], tmp_path, CAMPAIGN="mlp")
    assert r.returncode == 2 and "unknown CAMPAIGN=mlp (mnist or modadd)" in r.stderr
    r = _run(["run"], tmp_path)
    assert r.returncode == 2 and "usage" in r.stderr
    r = _run(["run", "not a time"], tmp_path)
    assert r.returncode == 2 and "bad time" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_slots_take_the_campaigns_runs_in_order_on_the_cores_given(tmp_path):
    soon = (datetime.now() + timedelta(seconds=30)).strftime("%Y-%m-%d %H:%M:%S")  # under the 2 minutes a slot needs
    r = _run(["run", soon], tmp_path, CAMPAIGN="modadd", CORES="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["slot 1: no time left for wd1.0_seed0"]
    r = _run(["run", soon], tmp_path, CORES="1 0")  # the MLP campaign: its first two runs, one a slot
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["slot 0: no time left for wd0_seed1", "slot 1: no time left for wd0.01_seed0"]


def test_status_lists_the_step_each_run_has_reached(tmp_path):
    run = tmp_path / "runs" / "wd0.1_seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps({"step": 4096, "test/acc": 0.5}) + "\n")
    r = _run(["status"], tmp_path, CAMPAIGN="modadd")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wd0.1_seed0: step 4096 ({run})\n"
    # a run with no run directory here is read from its export (a fresh machine continues from there)
    exp = tmp_path / "exports" / "wd0_seed0"
    exp.mkdir(parents=True)
    (exp / "metrics.jsonl").write_text(json.dumps({"step": 8192, "test/acc": 0.9}) + "\n")
    r = _run(["status"], tmp_path, CAMPAIGN="modadd")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wd0.1_seed0: step 4096 ({run})\nwd0_seed0: step 8192 ({exp})\n"
