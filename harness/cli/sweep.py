"""``harness sweep SPEC.yaml`` / ``harness sweep --preset paper``: run a grid of cells as a DAG of
Ray tasks (resumable), or print its plan (``--dry-run``).

The sweep modules (and torch, ray) are imported when the command runs, not when the parser is
built, so ``harness --help`` stays fast.
"""

from __future__ import annotations

import json

from harness.cli.grid_options import add_grid_options, add_run_options


def build_from_args(args):
    """The sweep of the command line: the file (or preset section), then the flags that override it."""
    from harness.sweep.dag import build
    from harness.sweep.grid import copy_spec, load_sweep_spec

    spec, preset, _ = load_sweep_spec(args.spec, args.preset)
    changes = {}
    if args.retries is not None:
        changes["retries"] = args.retries
    if args.gpu:
        changes["gpu"] = args.gpu
    if args.isolate:
        changes["isolate"] = args.isolate
    if getattr(args, "max_cells", None) is not None:
        changes["max_cells"] = args.max_cells
    if changes:
        spec = copy_spec(spec, **changes)
    sets = list(args.sets) + ([f"model.device={args.device}"] if getattr(args, "device", None) else [])
    return build(spec, preset, output=args.output, storage=args.storage, models=args.model or None,
                 extra_sets=sets)


def apply_gpus(args) -> None:
    """``--gpus``: N / indices narrow CUDA_VISIBLE_DEVICES before Ray starts; NxPROFILE (dry run)
    sets the cost-model profile and the GPU count the plan is made for."""
    from harness.cli.run import select_gpus

    value = getattr(args, "gpus", None)
    if not value or value == "all":
        return
    found = select_gpus(value, args.dry_run)
    if "x" in value.lower():
        args.gpu = value.lower().split("x", 1)[1]
    if found is not None and args.num_gpus is None:
        args.num_gpus = float(len(found))


def cmd_sweep(args) -> int:
    from harness.sweep.dag import format_plan, plan_json
    from harness.sweep.grid import format_seconds
    from harness.sweep.runner import SweepRunner

    apply_gpus(args)
    sweep = build_from_args(args)
    if args.dry_run:
        _, todo = sweep.scan()
        gpus = args.num_gpus
        if gpus is None:
            import torch

            gpus = float(torch.cuda.device_count()) or 1.0
        summary = sweep.summary(todo, gpus=gpus, cpus=args.num_cpus or 1e9)
        if args.json:
            print(json.dumps({**summary, "plan": plan_json(sweep, todo)}, indent=2, default=str))
        else:
            print(format_plan(sweep, summary))
            if args.verbose_plan:
                for st in sweep.stages.values():
                    mark = "run " if st.id in todo else "done"
                    print(f"  [{mark}] {st.kind:<10} {st.label:<50} {st.resources.total_gpus:>5g} GPU "
                          f"{format_seconds(st.estimate_s):>9}  after: {', '.join(st.deps) or '-'}")
        return 0
    runner = SweepRunner(sweep, progress=not args.no_progress, keep_checkpoints=getattr(args, "keep_checkpoints", "all"))
    summary = runner.run(address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                         log_to_driver=args.worker_logs)
    print(json.dumps(summary, indent=2))
    bad = sum(v for k, v in summary["records"].items() if k not in ("ok", "diverged"))
    return 0 if bad == 0 else 1


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of cells as a DAG of Ray tasks (resumable)",
                       description="Expand a sweep file (or a preset's sweep: section) into cells and run its stages "
                                   "(defence once per defended model, pre-attack scores once per defended model, "
                                   "attack + scores per cell) on Ray. Re-running resumes.")
    add_grid_options(p, "sweep")  # SPEC, --preset, --model, --set (shared with harness search)
    p.add_argument("--storage", help="defended-checkpoint folder; a path every node sees (default OUTPUT/checkpoints)")
    add_run_options(p, "sweep")  # --output, --address, --dry-run, --no-progress
    p.add_argument("--num-gpus", type=float, help="GPUs of a local Ray (fake ones on CPU for tests); for --dry-run: "
                                                  "the GPUs to estimate the makespan for")
    p.add_argument("--num-cpus", type=float, help="CPUs of a local Ray")
    p.add_argument("--retries", type=int, help="extra attempts of a failed stage (default: the sweep's, 2)")
    p.add_argument("--gpu", help="cost-model GPU profile (h100, a100-80, ...)")
    p.add_argument("--isolate", choices=["process", "reuse"],
                   help="process (default): a fresh worker per stage, so GPU memory goes back; reuse: warm workers")
    p.add_argument("--max-cells", type=int, metavar="N",
                   help="refuse a grid of more than N cells (default: the sweep's max_cells, 5000); counted before "
                        "any cell is built")
    p.add_argument("--json", action="store_true", help="with --dry-run: machine-readable plan")
    p.add_argument("--verbose-plan", action="store_true", help="with --dry-run: list every stage")
    p.add_argument("--worker-logs", action="store_true", help="also stream the workers' logs to this terminal")
    from harness.cli.run import add_device_args

    add_device_args(p)
    p.set_defaults(func=cmd_sweep)
