"""The analysis half: HTSR (alpha, correlation traps, the MP fit) natively and through
WeightWatcher, the progress measures, phase definitions, the paper's tables and figures, the
in-loop monitor's computation, the trap ablation, and the pipeline that analyses a run.

It reads run directories only through `grokjax.rundir` and `grokjax.ckpt`, and the data
through `grokjax.data`; it imports nothing from `grokjax.train`. The way through it:
`runs` (find, name and read runs) -> `pipeline` (plan, compute in the `pool`, merge, cache)
-> `report` (tables, `paper`, `figures`) and `ablation`; `htsr.shuffle_fit` is the one
W^rand primitive under every trap count (`htsr`, `meanaware`, `ablation`).

Imports sit at the top of each module except four, each for a stated cost: `wwadapter`
imports weightwatcher on first use (3-8 s, and process-wide side effects it saves and
restores); `htsr.blas_thread_limit` imports threadpoolctl on first use (optional); the monitor's
record process (`record_worker`) imports the analysis after lowering its CPU priority; `cli`
imports the analysis stack after checking its arguments (seconds of start-up, see its docstring).
"""
