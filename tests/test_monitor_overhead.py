"""The monitor-overhead measurement tool: its arithmetic and its bad-input lines (no timing asserted)."""

import json
import subprocess
import sys

import pytest

from grokjax.bench import monitor_overhead as mo
from grokjax.train.schedule import eval_steps


def test_overhead_arithmetic_and_projection(monkeypatch, tmp_path, capsys):
    walls = iter([100.0, 112.0, 104.0, 110.0])  # off, on, off, on

    def fake(steps, monitor, extra):
        assert extra == ["--seed", "1"]
        return dict(monitor=monitor, wall=next(walls), train_wall=80.0, evals=50, records=45 if monitor else 0,
                    note="")

    monkeypatch.setattr(mo, "_one", fake)
    out = tmp_path / "o.json"
    assert mo.main(["--steps", "1e4", "--rounds", "2", "--project", "1e6", "--json", str(out), "--", "--seed", "1"]) == 0
    got = json.loads(out.read_text())
    assert got["wall_off"] == 102.0 and got["wall_on"] == 111.0
    assert got["overhead"] == pytest.approx(111 / 102 - 1)
    assert got["per_eval_s"] == pytest.approx(9 / 45)
    k = len(eval_steps(10**6))
    # training time at 1e6 steps at 1e4 / 80 steps/s
    assert got["projections"]["1000000"]["overhead_pct"] == pytest.approx(100 * k * 9 / 45 / (1e6 / (1e4 / 80)))
    assert "overhead +8.8%" in capsys.readouterr().out


@pytest.mark.parametrize("args, msg", [(["--steps", "1.5"], "whole number"), (["--rounds", "0"], "positive"),
                                       (["--project", "x"], "--project")])
def test_bad_input_is_one_line(root, args, msg):
    r = subprocess.run([sys.executable, str(root / "experiments" / "monitor_overhead.py"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
