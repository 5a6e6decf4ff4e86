"""The training half: the frozen run configuration, the MLP, the jitted AdamW step and its
`lax.scan` chunks, the evaluation schedule, the run loop with its pauses, and its command line.

It reads and writes run directories through `grokjax.rundir` and `grokjax.ckpt`, and runs the
analysis half's monitor beside training; the analysis half never imports this package.
"""
