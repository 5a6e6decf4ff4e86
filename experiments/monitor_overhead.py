"""Wall-time overhead of the in-loop HTSR monitor: `python experiments/monitor_overhead.py --steps 1e5`
(see `--help`; the code is `grokjax.bench.monitor_overhead`)."""

from grokjax.bench.monitor_overhead import run

if __name__ == "__main__":
    run()
