"""The sweep as one validated value (grokjax.train.sweep): the replicas' order, directories and
weight decays, the vector the step needs, and every bad input refused before anything is written."""

import pytest

from grokjax.train.config import ConfigError, TrainConfig
from grokjax.train.sweep import make_sweep


def test_one_run_is_a_sweep_of_one(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), wd=0.01, seed=3)
    sweep = make_sweep(cfg)
    assert sweep.replicas == (cfg,) and sweep.shared == cfg and not sweep.stacked
    assert sweep.wd_vector is None  # one weight decay: the step uses shared.wd


def test_seeds_and_weight_decays_expand_in_order(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "s"), wd=0.5, seed=9)
    sweep = make_sweep(cfg, seeds=[0, 2], wds=[0.0, 0.01])
    assert [(c.wd, c.seed) for c in sweep.replicas] == [(0.0, 0), (0.0, 2), (0.01, 0), (0.01, 2)]
    assert [c.out for c in sweep.replicas] == [str(tmp_path / "s" / n) for n in
                                               ("wd0_seed0", "wd0_seed2", "wd0.01_seed0", "wd0.01_seed2")]
    assert sweep.stacked and sweep.wd_vector == [0.0, 0.0, 0.01, 0.01]
    assert sweep.shared.wd == 0.0 and sweep.shared.out == cfg.out  # replica 0's weight decay, the parent dir
    seeds_only = make_sweep(cfg, seeds=[1])
    assert seeds_only.stacked and [c.out for c in seeds_only.replicas] == [str(tmp_path / "s" / "seed1")]
    assert seeds_only.wd_vector is None and seeds_only.replicas[0].wd == 0.5
    assert make_sweep(cfg, wds=[0.001]).replicas[0].seed == 9  # without --seeds the sweep uses --seed


@pytest.mark.parametrize("seeds, wds, msg", [([1, 1], None, "seeds must be distinct"), ([], None, "seeds must be"),
                                             (None, [0.0, 0.0], "distinct finite numbers >= 0"),
                                             (None, [-0.1], "finite numbers >= 0"),
                                             (None, [float("nan")], "finite numbers >= 0"), (None, [], "--wds")])
def test_bad_sweeps_are_refused_before_anything_is_written(tmp_path, seeds, wds, msg):
    with pytest.raises(ConfigError, match=msg):
        make_sweep(TrainConfig(out=str(tmp_path / "x")), seeds=seeds, wds=wds)
    assert not (tmp_path / "x").exists()
