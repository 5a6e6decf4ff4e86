"""HTSR spectra, progress measures and the paper's tables and figures for trained runs.

    python analysis/spectra.py ckpts/                 # every run below ckpts/ (found by config.json)
    python analysis/spectra.py ckpts/wd0_s0 --engine native --no-figures
    python analysis/spectra.py ckpts/wd0_s0 --ablate-traps     # also: remove the traps, measure accuracy

Per run the results are cached in `<run>/analysis/` and reused while the inputs are unchanged;
the combined tables, report.md, summary.txt and figures go to `--out` (default
`<input>/analysis`), all at once at the end. Inputs are checked first: a problem that leaves
a part out (a torn metrics line, an unreadable checkpoint) is one warning line, an error
with --strict; bad inputs exit with code 2 and one line per problem on stderr, and leave
the previous outputs as they were.

Imports: the analysis stack (`grokjax.analysis.report` and `pipeline`: pandas, scipy, Orbax
and JAX through `grokjax.ckpt`, matplotlib) takes seconds to import (measured 1.6 s for the
report module alone and 11 s for the pipeline on this 2-core machine under load), so `main`
imports it only after the arguments and the input path are checked: `--help` and a bad flag
or path answer at once. The ablation module is imported only with `--ablate-traps`.
"""

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from grokjax.cliutil import OneLineParser

PROG = "spectra.py"


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low (`what` names it in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_draws = _int_at_least(2, "an integer >= 2")


def _one_line(e: Exception, limit: int = 400) -> str:
    """The message on one line, without TensorStore's spec dump, at most `limit` characters."""
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", " ".join(str(e).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each: 'spectra.py: warning: <file/step>: <problem>'."""
    print(f"{PROG}: warning: {_one_line(message)}", file=file or sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="HTSR analysis of grokking runs (tables + figures).", allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="a run directory, or a folder searched recursively for runs (config.json)")
    p.add_argument("--engine", choices=("native", "ww", "both"), default="both",
                   help="HTSR engine: native (fast), ww (WeightWatcher 0.7.5.5, ~3-6 s per checkpoint), or both")
    p.add_argument("--out", default=None, help="output folder (None: <input>/analysis)")
    p.add_argument("--paper-text", action="store_true",
                   help="circuit complexity as in the paper's text (10%% zeroed, no rescale, sum over 1,000 images)")
    p.add_argument("--workers", type=_positive_int, default=2, help="worker processes")
    p.add_argument("--ww-stride", type=_positive_int, default=1,
                   help="WW on every k-th checkpoint (plus first, last and phase steps)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--rerun", action="store_true", help="ignore cached results")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.add_argument("--strict", action="store_true",
                   help="treat every input warning (dropped metrics line, skipped checkpoint, ...) as an error")
    p.add_argument("--ablate-traps", action="store_true",
                   help="remove the correlation traps from the weights and measure accuracy (ablation.csv)")
    p.add_argument("--ablate-draws", type=_draws, default=5,
                   help="random bulk-mode draws of the ablation's control")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.input)
    if not root.exists():
        print(f"{PROG}: error: {root} does not exist", file=sys.stderr)
        return 2
    from grokjax.analysis.pipeline import AnalysisError, AnalysisOptions  # noqa: PLC0415  (heavy imports after the check)
    from grokjax.ckpt import CheckpointError  # noqa: PLC0415
    from grokjax.data import DataError  # noqa: PLC0415
    from grokjax.analysis.preflight import AnalysisWarning  # noqa: PLC0415
    from grokjax.analysis.progress import ProgressOptions  # noqa: PLC0415
    from grokjax.analysis.report import make_report  # noqa: PLC0415

    if args.ablate_traps and _modadd_runs(root):
        print(f"{PROG}: error: --ablate-traps measures the MNIST MLP's accuracy; {root} holds --task modadd runs",
              file=sys.stderr)
        return 2
    options = AnalysisOptions(engine=args.engine, progress=ProgressOptions(paper_text=args.paper_text),
                              workers=args.workers, ww_stride=args.ww_stride, progress_bar=args.progress,
                              reuse=not args.rerun, strict=args.strict)
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", AnalysisWarning)  # every problem, even one seen before
    try:
        result = make_report(root, options=options, out_dir=args.out, figures=not args.no_figures)
        ablation = None
        if args.ablate_traps:
            from grokjax.analysis.ablation import AblationOptions, ablate_runs  # noqa: PLC0415

            ablation = ablate_runs(root, out_dir=result["out_dir"], analysis=options, figures=not args.no_figures,
                                   runs=result["runs"],
                                   options=AblationOptions(n_draws=args.ablate_draws, workers=args.workers,
                                                           progress_bar=args.progress))
    except (AnalysisError, CheckpointError, DataError) as e:
        for line in str(e).splitlines() or [""]:  # one line per problem
            print(f"{PROG}: error: {_one_line(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished runs are cached", file=sys.stderr)
        return 130
    print(result["summary"])
    print(f"tables: {result['out_dir']} (report.md, *.csv, all_layers/all_steps .parquet/.csv)")
    if result["figures"]:
        print(f"figures: {result['out_dir'] / 'figures'} ({len(result['figures'])} PNG)")
    if ablation is not None:
        print(f"ablation: {ablation['out_dir'] / 'ablation.csv'} ({len(ablation['table'])} rows), ablation_traps.csv"
              + (f", {ablation['figure']}" if ablation["figure"] else ""))
    return 0


def _modadd_runs(root: Path) -> bool:
    """Whether a run at or below `root` is one of the modular-addition transformer (its config.json's task)."""
    from grokjax import rundir  # noqa: PLC0415

    for d in rundir.find_runs(root):
        try:
            if rundir.read_config(d).get("task") == "modadd":
                return True
        except rundir.RunDirError:
            continue  # the analysis reports it
    return False


def run() -> None:
    """The `grokjax-spectra` entry point (and `python analysis/spectra.py`): `main`, then exit."""
    code = main()
    if code == 2:
        # After a failed Orbax restore in this process, its asyncio threads print "Event loop
        # is closed" tracebacks at interpreter shutdown; the error line is already out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
