"""The analysis half: HTSR (alpha, correlation traps, the MP fit) natively and through
WeightWatcher, the progress measures, phase definitions, the paper's tables and figures, the
in-loop monitor's computation, the trap ablation, and the pipeline that analyses a run.

It reads run directories only through `grokjax.rundir` and `grokjax.ckpt`, and the data
through `grokjax.data`; it imports nothing from `grokjax.train`.
"""
