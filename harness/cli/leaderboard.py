"""``harness leaderboard`` and ``harness nightly`` sub-commands.

    harness leaderboard RESULTS_DIR --out leaderboards/NAME [--format md,csv,html,tex] [--no-plots]
                        [--examples N] [--title TEXT]

``harness leaderboard`` also writes the worst-case table (``worstcase.<format>``) and its heat map
(``worstcase.png``, listed with the figures) when the records hold a worst-case search or a defence
attacked by several attacks (``leaderboards.worstcase.applies``); otherwise it removes an earlier
one of the formats it writes.
    harness nightly [--suite smoke] [--output DIR] [--baseline FILE] [--update-baseline]
                    [--set KEY=VALUE ...] [--model ID_OR_FOLDER] [--reuse] [--keep-checkpoints]
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.api.errors import ConfigError
from harness.api.record import RecordError
from harness.lib.store import load_records


def cmd_leaderboard(args) -> int:
    from leaderboards.render import FORMATS, unreadable_lines, write_leaderboard  # pandas
    from leaderboards.views import load_samples

    results = Path(args.results)
    if not results.is_dir():
        raise ConfigError(f"results folder {str(results)!r} does not exist")
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"--format {args.format!r}: choose from {', '.join(FORMATS)} (comma separated)")
    errors: list[RecordError] = []
    records = load_records(results, errors)
    for line in unreadable_lines(errors):
        print(f"warning: not in the tables: {results / line}", file=sys.stderr)
    from harness.sweep.status import record_warnings  # dead 'running' records, mixed schema versions

    for line in record_warnings(records, results):
        print(f"warning: {line}", file=sys.stderr)
    if not records:
        print(f"warning: no records in {results}", file=sys.stderr)
    if args.examples < 0:
        raise ConfigError(f"--examples {args.examples}: must be 0 (no side-by-side page) or more")
    samples = load_samples(records, results)
    missing = sorted(tid for tid, s in samples.items() if s.missing)
    if missing:
        print(f"warning: {len(missing)} record(s) without per-prompt scores (counted in their cells, no CI from "
              f"them), e.g. {missing[0]}: {samples[missing[0]].missing}", file=sys.stderr)
    out = Path(args.out)
    figures: list[str] = []
    if not args.no_plots:
        from leaderboards.plots import all_plots  # matplotlib

        figures = [str(p.relative_to(out)) for p in all_plots(records, results, out, samples)]
    # the worst-case table and heat map, when the records hold a search or several attacks per defence
    from leaderboards import worstcase

    worst: list[Path] = []
    if worstcase.applies(records, results):
        title = f"Worst case: {args.title or out.name}"
        worst = worstcase.write(results, out, records, formats, plots=not args.no_plots, title=title)
        figures += [str(p.relative_to(out)) for p in worst if p.suffix == ".png"]
    else:
        worstcase.remove_stale(out, formats, plots=not args.no_plots)
    written = write_leaderboard(records, out, formats, title=args.title or f"Leaderboard: {out.name}", figures=figures,
                                errors=errors, samples=samples, examples=args.examples, results_dir=results)
    for path in written + [out / f for f in figures if not f.startswith(worstcase.STEM + ".")] + worst:
        print(path)
    return 0


def cmd_nightly(args) -> int:
    from harness.sweep.nightly import run_suite  # torch, the pipeline
    from leaderboards.nightly import regression_lines

    result = run_suite(args.suite, args.output, baseline_path=args.baseline, update_baseline=args.update_baseline,
                       extra_sets=args.sets, model=args.model, reuse=args.reuse,
                       keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress)
    first = next((line for line in result.report.splitlines() if line.startswith("**")), "")
    print(first.replace("**", ""))
    for line in regression_lines(result.comparisons):
        print(line)
    for name, cell in result.cells.items():
        for rec in cell.failed():
            err = rec.error
            print(f"FAILED TRIAL {name} seed {rec.seed}: {rec.status} in {err.stage if err else None}: "
                  f"{err.message if err else None}")
    print(f"report: {result.report_path}")
    if args.update_baseline and result.exit_code == 0:
        print(f"baseline: {result.baseline_path}")
    return result.exit_code


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "leaderboard", help="tables (Markdown, CSV, HTML, LaTeX) and plots from a results folder",
        description="Build the leaderboard tables (immunization criteria, harmfulness/toxicity with 95%% CIs and "
                    "paired tests against the base model from the per-prompt samples, per-category harm, "
                    "capability, trainability), side-by-side generations and PNG plots from the result records "
                    "in RESULTS_DIR; with a worst-case search (harness search) or several attacks per defence, also "
                    "the worst-case table (worstcase.*) and heat map (worstcase.png).")
    p.add_argument("results", metavar="RESULTS_DIR", help="folder of result records (harness run --output)")
    p.add_argument("--out", required=True, help="output folder, e.g. leaderboards/smoke")
    p.add_argument("--format", default="md,csv", help="comma-separated: md, csv, html, tex (default md,csv)")
    p.add_argument("--examples", type=int, default=3,
                   help="prompts shown side by side in generations.md/.html (default 3; 0: none)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--title", help="title of the Markdown/HTML page (default: 'Leaderboard: <out folder name>')")
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser(
        "nightly", help="run a pinned regression suite and compare it with its baseline",
        description="Run the trials of a suite (leaderboards/suites/NAME.yaml), compare every metric with "
                    "results/baselines/NAME.json within per-metric tolerances, write a Markdown report; exit 1 on a "
                    "regression, 0 otherwise. --update-baseline rewrites the baseline on purpose.")
    p.add_argument("--suite", default="smoke", help="suite name (leaderboards/suites/*.yaml) or YAML path; default smoke")
    p.add_argument("--output", help="run folder for records, report.md and leaderboard/ "
                                    "(default results/nightly/SUITE)")
    p.add_argument("--baseline", help="baseline JSON (default results/baselines/SUITE.json)")
    p.add_argument("--update-baseline", action="store_true", help="write this run's metrics as the new baseline")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every trial of the suite (repeatable)")
    p.add_argument("--model", help="run every trial on this model instead of the suite's")
    p.add_argument("--reuse", action="store_true", help="skip trials already finished in the run folder and keep "
                                                        "defence checkpoints (default: rerun everything)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the defended checkpoints of this run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_nightly)
