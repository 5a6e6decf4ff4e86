"""Tables 1, 2 and 4 over seeds and the early-warning grid, from `analysis/spectra.py` outputs:
`python analysis/seeds.py results/wd0_1e7/analysis results/campaign_1e7/analysis --out results/seeds_1e7`."""

from grokjax.analysis.seeds import main

if __name__ == "__main__":
    raise SystemExit(main())
