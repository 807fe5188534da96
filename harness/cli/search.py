"""``harness search``: the worst-case attack on a defence (``harness.sweep.search``).

    harness search --defence repnoise --attack harmfulqa --budget 32 [--epsilon 0.1]
    harness search SWEEP.yaml            # its `search:` section, one search per defence x attack

Torch, Ray and Optuna are imported when the command runs, not when the parser is built.
"""

from __future__ import annotations

import json

from harness.cli.grid_options import add_grid_options, add_run_options


def _space_overrides(items) -> dict:
    from harness.api.config import parse_value
    from harness.api.errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--space {item!r}: expected KEY=RANGE, e.g. lr='{{log: [1e-5, 1e-3]}}' or r=null")
        key, raw = item.split("=", 1)
        out[key.strip()] = parse_value(raw)
    return out


def build(args):
    from harness.api.errors import ConfigError
    from harness.sweep.search import Search, SearchSettings, searches_from_file

    overrides = {k: v for k, v in (("budget", args.budget), ("epsilon", args.epsilon), ("algorithm", args.algorithm),
                                   ("harm", args.harm), ("concurrency", args.concurrency), ("num_gpus", args.num_gpus))
                 if v is not None}
    space = _space_overrides(args.space)
    sets = list(args.sets) + ([f"model.device={args.device}"] if args.device else [])
    if args.spec:
        if args.defence or args.attack:
            raise ConfigError("harness search: give a sweep file or --defence/--attack, not both")
        searches = searches_from_file(args.spec, None, output=args.output, extra_sets=sets, overrides=overrides,
                                      model=args.model, seed=args.seed)
        for s in searches:
            s.space_overrides.update(space)
        return searches
    if not args.attack:
        raise ConfigError("harness search: give --attack NAME (and --defence NAME) or a sweep file with a search: section")
    settings = SearchSettings.parse(overrides, "harness search")
    return [Search(args.preset, args.defence or "none", args.attack, settings, args.output or "results/search",
                   sets=sets, model=args.model, seed=args.seed, space_overrides=space)]


def print_summary(summary: dict) -> None:
    best = summary["best_feasible"]
    print(f"search {summary['search']}: {summary['n_trials']} trials ({summary['n_feasible']} feasible, "
          f"capability drop <= {summary['epsilon']:g})")
    if best:
        print(f"  best feasible: harm {best['harm']:.3f}, capability drop {best['capability_drop']:+.3f}, "
              f"{json.dumps(best['params'])}")
        print(f"  reproduce: {best['command']}")
    else:
        print("  no feasible trial")
    print("  Pareto front (harm vs capability drop):")
    for o in summary["pareto_front"]:
        print(f"    harm {o['harm']:.3f}  drop {o['capability_drop']:+.3f}  {'feasible' if o['feasible'] else 'infeasible'}"
              f"  {o['trial_id']}  {json.dumps(o['params'])}")


def cmd_search(args) -> int:
    searches = build(args)
    for s in searches:
        # a changed space would make a new search; the same one resumes
        if args.dry_run:
            print(json.dumps({"search": s.id, "folder": str(s.folder), "budget": s.settings.budget,
                              "epsilon": s.settings.epsilon, "algorithm": s.settings.algorithm,
                              "space": {k: v.as_dict() for k, v in s.space.items()},
                              "example": s.command({k: (v.choice[0] if v.kind == "choice" else v.args[0])
                                                    for k, v in s.space.items()})}, indent=2))
            continue
        print_summary(s.run(progress=not args.no_progress, address=args.address))
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="worst-case attack search (Ray Tune + Optuna TPE) on a defence",
                       description="Search the attack's hyper-parameters for the most harmful attack whose capability "
                                   "drop stays within --epsilon of the defended model; every trial is an ordinary "
                                   "record. Re-running the same command resumes.")
    add_grid_options(p, "search")  # SPEC, --preset, --model, --set (shared with harness sweep)
    p.add_argument("--defence", "--defense", help="defence name (default none)")
    p.add_argument("--attack", help="attack name")
    p.add_argument("--seed", type=int, help="random seed of the trials; default: the preset's")
    p.add_argument("--budget", type=int, help="number of trials (default 32, or the file's)")
    p.add_argument("--epsilon", type=float, help="largest relative capability drop of a feasible attack (default 0.1)")
    p.add_argument("--algorithm", choices=["tpe", "random"], help="search algorithm (default tpe)")
    p.add_argument("--harm", choices=["score", "answer_loss"],
                   help="harm measure to maximise: score (the attack's evaluation mean, default) or answer_loss "
                        "(exp of minus the loss on held-out harmful answers; scorer-free, for tiny models)")
    p.add_argument("--concurrency", type=int, help="trials at once (default 1)")
    p.add_argument("--num-gpus", type=float, help="GPUs per trial (default 0)")
    p.add_argument("--space", action="append", metavar="KEY=RANGE",
                   help="override the attack's range of KEY, e.g. --space 'samples={choice: [16, 32]}'; null drops it")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where models run")
    add_run_options(p, "search")  # --output, --address, --dry-run, --no-progress
    p.set_defaults(func=cmd_search)
