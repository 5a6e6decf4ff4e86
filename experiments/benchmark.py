"""Steps/s of the JAX trainer against the authors' PyTorch loop: `python experiments/benchmark.py`
(the same as the `grokjax-bench` command; see `--help`)."""

from grokjax.bench.cli import run

if __name__ == "__main__":
    run()
