"""``harness analyze weight-distance BASE OTHER... [--out DIR]``: per-layer L2 weight distance
between a base model folder and others (the paper's depth figure), as a CSV table and a PNG."""

from __future__ import annotations

from pathlib import Path


def run_weight_distance(args) -> int:
    # torch, safetensors, matplotlib: imported only when the command runs (CLI fast path)
    from harness.lib.analysis import CSV_NAME, PNG_NAME, plot_weight_distance, weight_distance

    df = weight_distance(args.base, args.others)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / CSV_NAME)
    plot_weight_distance(df, out / PNG_NAME)
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
