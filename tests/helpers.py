"""Small shared helpers for the tests."""

from grokjax.bench.init import torch_init  # noqa: F401  (PyTorch's default Linear init x 8, numpy)

# The small run most run-level tests train: 120 steps, 6 evaluation points per decade, chunks of 16.
SMALL = dict(steps=120, log_points_per_decade=6, authors_grid=False, chunk=16, progress=False, full_save_secs=0,
             monitor=False)

# A 300-step run evaluated (and checkpointed, with the monitor's records) at 10 log-spaced steps.
RUN300 = dict(steps=300, log_points_per_decade=3, authors_grid=False, chunk=64, progress=False, full_save_secs=0)
