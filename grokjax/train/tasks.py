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

from grokjax.train.config import TrainConfig


class MnistMLP:
    """The paper's depth-3 MLP on 1,000 MNIST images (`grokjax.train.engine`)."""

    name = "mnist_mlp"

    def load_host(self, cfg: TrainConfig, mnist: dict | None):
        from grokjax.data import load_mnist  # noqa: PLC0415

        return mnist if mnist is not None else load_mnist(cfg.cache_dir, cfg.idx_dir)

    def make_data(self, cfg: TrainConfig, host):
        from grokjax.train.engine import make_data  # noqa: PLC0415

        return make_data(cfg, host)

    def order(self, cfg: TrainConfig) -> np.ndarray:
        from grokjax.train.engine import batch_perm  # noqa: PLC0415

        return batch_perm(cfg)

    def init_state(self, cfg: TrainConfig):
        from grokjax.train.engine import init_state  # noqa: PLC0415

        return init_state(cfg)

    def make_chunk(self, cfg: TrainConfig, n_seeds: int | None, wds):
        from grokjax.train.engine import make_train_chunk  # noqa: PLC0415

        return make_train_chunk(cfg, n_seeds, wds=wds)

    def columns(self, cfg: TrainConfig, orders: np.ndarray, data):
        from grokjax.train.engine import pixel_columns  # noqa: PLC0415

        return pixel_columns(cfg, orders, np.asarray(data.x_train))

    def make_evaluate(self, n_seeds: int | None):
        from grokjax.train.engine import make_evaluate  # noqa: PLC0415

        return make_evaluate(n_seeds)

    def monitor_inputs(self, cfg: TrainConfig, host) -> dict:
        from grokjax.analysis.progress import load_inputs  # noqa: PLC0415

        return load_inputs(cfg.n_per_class, cfg.data_seed, cfg.seed, mnist=host)


class ModAdd:
    """The one-layer transformer on (a + b) mod p of the paper's App. H (`grokjax.modadd`)."""

    name = "modadd"

    def load_host(self, cfg: TrainConfig, mnist: dict | None):
        from grokjax.modadd.data import make_split  # noqa: PLC0415

        return make_split(cfg.modadd())

    def make_data(self, cfg: TrainConfig, host):
        from grokjax.modadd.data import to_device  # noqa: PLC0415

        return to_device(host)

    def order(self, cfg: TrainConfig) -> np.ndarray:
        from grokjax.modadd.data import split_indices  # noqa: PLC0415

        return split_indices(cfg.p, cfg.frac_train, cfg.split_seed)[0].astype(np.int64)

    def init_state(self, cfg: TrainConfig):
        from grokjax.modadd.step import init_state  # noqa: PLC0415

        return init_state(cfg.modadd())

    def make_chunk(self, cfg: TrainConfig, n_seeds: int | None, wds):
        from grokjax.modadd.step import make_train_chunk  # noqa: PLC0415

        chunk = make_train_chunk(cfg.modadd(), cfg.forward, n_seeds, wds=wds)

        def run(state, order, data, length: int, cols=None):  # noqa: ARG001  (full batch: no order, no columns)
            return chunk(state, data, length)

        return run

    def columns(self, cfg: TrainConfig, orders: np.ndarray, data):  # noqa: ARG002
        return None

    def make_evaluate(self, n_seeds: int | None):
        from grokjax.modadd.step import make_evaluate  # noqa: PLC0415

        return make_evaluate(n_seeds)

    def monitor_inputs(self, cfg: TrainConfig, host) -> dict:  # noqa: ARG002
        from grokjax.analysis.modadd import load_inputs  # noqa: PLC0415

        return load_inputs(cfg.p, cfg.frac_train, cfg.split_seed)


TASKS = {t.name: t for t in (MnistMLP(), ModAdd())}


def task_of(cfg: TrainConfig):
    """The `Task` that trains `cfg` (by `cfg.task`)."""
    return TASKS[cfg.task]
