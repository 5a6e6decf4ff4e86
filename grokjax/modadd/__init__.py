"""Modular addition, the paper's second setting: a one-layer transformer on (a + b) mod p.

The modules follow the MLP's split: `config` (every knob, with its source), `data` (all p^2
pairs and the seeded split), `model` (the Flax transformer and its last-position fast path),
`step` (the loss, AdamW with warm-up, the scan chunk, evaluation). The setting, its defaults
and how it plugs into the runner are docs/modadd.md. Importing this package imports nothing
heavy; the analysis of a trained transformer is `grokjax.analysis.modadd` (numpy only).
"""
