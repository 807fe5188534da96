"""``harness analyze weight-distance BASE OTHER... [--out DIR]``: per-layer L2 weight distance
between a base model folder and others (the paper's depth figure), as a CSV table and a PNG."""

from __future__ import annotations

from pathlib import Path

from harness.api.errors import HarnessError


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


def run_weight_distance(args) -> int:
    # torch, safetensors, matplotlib: imported only when the command runs (CLI fast path)
    from harness.lib.analysis import CSV_NAME, PNG_NAME, plot_weight_distance, weight_distance

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {str(out)!r} is a file, not a folder")
    try:  # bad folders and damaged weights: one line naming the file (docs/reliability.md)
        df = weight_distance(args.base, args.others)
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. safetensors' header errors: a damaged file, said in one line
        where = "" if any(str(p) in str(exc) for p in [args.base, *args.others]) else \
            f"reading {args.base} / {', '.join(map(str, args.others))}: "
        raise HarnessError(f"analyze weight-distance: {where}{type(exc).__name__}: {_one_line(exc)}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / CSV_NAME)
        plot_weight_distance(df, out / PNG_NAME)
    except OSError as exc:
        raise HarnessError(f"analyze weight-distance: cannot write to --out {str(out)!r}: "
                           f"{exc.strerror or exc}") from None
    print(df.to_string(float_format=lambda v: f"{v:.6g}"))
    print(f"\nwrote {out / CSV_NAME} and {out / PNG_NAME}")
    return 0


def register(subparsers):
    """Add ``analyze weight-distance`` to an argparse sub-parser set; the handler is
    ``args.func(args) -> exit code``."""
    analyze = subparsers.add_parser("analyze", help="analyses of saved checkpoints",
                                    description="Analyses of saved checkpoints.")
    sub = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    wd = sub.add_parser("weight-distance", help="per-layer L2 distance between a base model and others",
                        description="Per-layer L2 weight distance between BASE and each OTHER model folder "
                                    "(the paper's depth figure): a CSV table and a PNG plot in --out.")
    wd.add_argument("base", metavar="BASE", help="base model folder")
    wd.add_argument("others", metavar="OTHER", nargs="+", help="model folders to compare with BASE")
    wd.add_argument("--out", default=".", metavar="DIR", help="where to write the CSV and the PNG (default: .)")
    wd.set_defaults(func=run_weight_distance)
    return analyze
