"""The training tasks behind one runner: what differs between the MNIST MLP and the transformer.

`task_of(cfg)` returns the `Task` of `cfg.task`; the runner (`grokjax.train.runner`) calls only
this interface, so the run directory, the schedule, the checkpoints, resume, pause, sweeps and
the monitor are the same code for both tasks. Per task it says:

* `load_host(cfg, mnist)`: the host data (MNIST arrays; the p^2 pairs' split);
* `make_data(cfg, host)`: the device-resident arrays the chunks read;
* `order(cfg)`: a replica's saved order, checked on resume (the MLP's fixed batch order; the
  transformer trains on the whole training split every step, so its order is the split's
  pair indices, which a resume checks just the same);
* `init_state(cfg)`: a fresh `TrainState` (params, opt_state, step, key);
* `make_chunk(cfg, n_seeds, wds)`: `chunk(state, order, data, length, cols)`, a jitted scan;
* `columns(cfg, orders, data)`: the MLP's FC1 pixel columns, None for the transformer;
* `make_evaluate(n_seeds)`: the metrics of one evaluation (`train/loss`, `train/acc`,
  `test/loss`, `test/acc`, `params/l2`, and the MLP's `params/l2_weights`, `params/l2_fc3`);
* `monitor_inputs(cfg, host)`: what the in-loop monitor computes its progress measures from
  (MNIST images; the pairs and the split for the transformer's Fourier measures).
"""

from __future__ import annotations

import numpy as np

from grokjax import data as mnist_data
from grokjax.modadd import data as modadd_data, step as modadd_step
from grokjax.train import engine
from grokjax.train.config import TrainConfig


class MnistMLP:
    """The paper's depth-3 MLP on 1,000 MNIST images (`grokjax.train.engine`)."""

    name = "mnist_mlp"

    def load_host(self, cfg: TrainConfig, mnist: dict | None):
        return mnist if mnist is not None else mnist_data.load_mnist(cfg.cache_dir, cfg.idx_dir)

    def make_data(self, cfg: TrainConfig, host):
        return engine.make_data(cfg, host)

    def order(self, cfg: TrainConfig) -> np.ndarray:
        return engine.batch_perm(cfg)

    def init_state(self, cfg: TrainConfig):
        return engine.init_state(cfg)

    def make_chunk(self, cfg: TrainConfig, n_seeds: int | None, wds):
        return engine.make_train_chunk(cfg, n_seeds, wds=wds)

    def columns(self, cfg: TrainConfig, orders: np.ndarray, data):
        return engine.pixel_columns(cfg, orders, np.asarray(data.x_train))

    def make_evaluate(self, n_seeds: int | None):
        return engine.make_evaluate(n_seeds)

    def monitor_inputs(self, cfg: TrainConfig, host) -> dict:
        from grokjax.analysis.progress import load_inputs  # noqa: PLC0415  (pandas, scipy: only with the monitor)

        return load_inputs(cfg.n_per_class, cfg.data_seed, cfg.seed, mnist=host)


class ModAdd:
    """The one-layer transformer on (a + b) mod p of the paper's App. H (`grokjax.modadd`)."""

    name = "modadd"

    def load_host(self, cfg: TrainConfig, mnist: dict | None):
        return modadd_data.make_split(cfg.modadd())

    def make_data(self, cfg: TrainConfig, host):
        return modadd_data.to_device(host)

    def order(self, cfg: TrainConfig) -> np.ndarray:
        return modadd_data.split_indices(cfg.p, cfg.frac_train, cfg.split_seed)[0].astype(np.int64)

    def init_state(self, cfg: TrainConfig):
        return modadd_step.init_state(cfg.modadd())

    def make_chunk(self, cfg: TrainConfig, n_seeds: int | None, wds):
        chunk = modadd_step.make_train_chunk(cfg.modadd(), cfg.forward, n_seeds, wds=wds)

        def run(state, order, data, length: int, cols=None):  # noqa: ARG001  (full batch: no order, no columns)
            return chunk(state, data, length)

        return run

    def columns(self, cfg: TrainConfig, orders: np.ndarray, data):  # noqa: ARG002
        return None

    def make_evaluate(self, n_seeds: int | None):
        return modadd_step.make_evaluate(n_seeds)

    def monitor_inputs(self, cfg: TrainConfig, host) -> dict:  # noqa: ARG002
        from grokjax.analysis.modadd import load_inputs  # noqa: PLC0415  (pandas, scipy: only with the monitor)

        return load_inputs(cfg.p, cfg.frac_train, cfg.split_seed)


TASKS = {t.name: t for t in (MnistMLP(), ModAdd())}


def task_of(cfg: TrainConfig):
    """The `Task` that trains `cfg` (by `cfg.task`)."""
    return TASKS[cfg.task]
