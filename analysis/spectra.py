"""HTSR spectra, progress measures and the paper's tables and figures for trained runs:
`python analysis/spectra.py RUNS/` (the same as the `grokjax-spectra` command; see `--help`)."""

from grokjax.analysis.cli import run

if __name__ == "__main__":
    run()
