"""Command line: ``nasreid search | hpo | derive | train | evaluate | plot | list``.

    nasreid search recipes/osnet_ain.yaml              # one-shot search, writes results/<run>/
    nasreid derive results/<run>                       # genotype.json (+ GraphML) from the last checkpoint
    nasreid train recipes/osnet_ain_retrain.yaml --genotype results/<run>/genotype.json
    nasreid evaluate results/<retrain-run> [--target market1501=/data/market1501]
    nasreid plot results/<run>                         # architecture-weight trajectories (PNG/SVG)
    nasreid hpo recipes/rmgl_cpu.yaml --workers 2      # Optuna study shared by 2 worker processes
    nasreid list [spaces|strategies|datasets|losses|matchers|postprocessors|methods] [PATTERN]

``--set key=value`` overrides a recipe key (dotted, YAML-typed), e.g. ``--set optim.epochs=2``.
``--resume RUN`` continues an interrupted run from its last checkpoint. ``--plugin FILE.py`` imports a
user's module that registers its own spaces, strategies, losses ... (as a recipe's ``plugins:`` does).

Errors in the user's input (:class:`nasreid.errors.NasreidError`: recipe, genotype, dataset, image,
checkpoint, run folder, diverged loss) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = ["main", "build_parser"]


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _targets(specs: Sequence[str]):
    """``name[=root][:k=v,k=v]`` -> DatasetRef list."""
    from nasreid.config import DatasetRef

    refs = []
    for s in specs or []:
        head, _, kw = s.partition(":")
        name, _, root = head.partition("=")
        kwargs = {}
        for item in filter(None, kw.split(",")):
            k, _, v = item.partition("=")
            kwargs[k] = yaml.safe_load(v)
        refs.append(DatasetRef(name=name, root=root or None, kwargs=kwargs))
    return refs


def _recipe_and_run(args):
    """(recipe, run folder) of ``search``/``train``: the recipe given, or the run's own with --resume."""
    from nasreid.config import load_recipe

    if args.resume:
        if not (Path(args.resume) / "recipe.yaml").is_file():
            from nasreid.errors import RunFolderError

            raise RunFolderError(f"{args.resume} is not a nasreid run folder: recipe.yaml is missing")
        return load_recipe(Path(args.resume) / "recipe.yaml", _overrides(args.set)), args.resume
    if args.recipe:
        return load_recipe(args.recipe, _overrides(args.set)), args.out
    raise SystemExit(f"nasreid {args.command}: give a recipe or --resume RUN")


def build_parser() -> argparse.ArgumentParser:
    """The ``nasreid`` argument parser (sub-commands search, derive, train, evaluate, plot)."""
    ap = argparse.ArgumentParser(prog="nasreid", description="Neural architecture search for person re-ID.")
    sub = ap.add_subparsers(dest="command", required=True)

    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                        help="import a module that registers spaces/strategies/losses/... (repeatable)")

    s = sub.add_parser("search", parents=[plugin], help="search an architecture (one-shot or sampling strategy)")
    s.add_argument("recipe", nargs="?", help="search recipe YAML (omit with --resume)")
    s.add_argument("--out", help="run folder (default: <output_root>/<name>_<timestamp>)")
    s.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    s.add_argument("--no-retrain", action="store_true", help="skip the recipe's then_retrain step")

    h = sub.add_parser("hpo", parents=[plugin], help="Optuna search (sampling strategy) with N worker processes")
    h.add_argument("recipe", nargs="?", help="search recipe YAML with strategy.name optuna (omit with --resume)")
    h.add_argument("--workers", type=int, default=1, help="worker processes on the study (default 1)")
    h.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    h.add_argument("--out", help="run folder (default: <output_root>/<name>_<timestamp>)")
    h.add_argument("--resume", metavar="RUN", help="continue the study of this run folder")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    h.add_argument("--no-retrain", action="store_true", help="skip the recipe's then_retrain step")

    hw = sub.add_parser("hpo-worker", parents=[plugin], help=argparse.SUPPRESS)
    hw.add_argument("run")
    hw.add_argument("--worker", type=int, default=0)
    hw.add_argument("--threads", type=int)

    d = sub.add_parser("derive", parents=[plugin], help="derive genotype.json from a search run")
    d.add_argument("run")
    d.add_argument("--out", help="folder for genotype.json (default: the run folder)")

    t = sub.add_parser("train", parents=[plugin], help="retrain a fixed network from a genotype and evaluate it")
    t.add_argument("recipe", nargs="?", help="retrain recipe YAML (omit with --resume)")
    t.add_argument("--genotype", help="genotype.json, or preset:<name> (e.g. preset:osnet_ain)")
    t.add_argument("--out", help="run folder")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("evaluate", parents=[plugin], help="CMC / mAP of a retrained run, same- and cross-domain")
    e.add_argument("run")
    e.add_argument("--target", action="append", default=[], metavar="NAME[=ROOT][:k=v,...]",
                   help="cross-domain dataset (repeatable); default: the recipe's eval.targets")
    e.add_argument("--no-same-domain", action="store_true", help="skip the training dataset's test split")
    e.add_argument("--device", help="override the recipe's device")

    p = sub.add_parser("plot", help="plot architecture-weight trajectories of a search run (an HPO run: Optuna's "
                       "history, intermediate values, importances / Pareto front)")
    p.add_argument("run")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--format", action="append", default=[], choices=["png", "svg", "pdf"])

    ls = sub.add_parser("list", parents=[plugin], help="print what is registered (spaces, strategies, ...)")
    ls.add_argument("kind", nargs="?", help="one registry: spaces, strategies, datasets, losses, matchers, "
                    "postprocessors, methods (default: all)")
    ls.add_argument("pattern", nargs="?", default="*", help="shell pattern on the names, e.g. 'osnet*'")
    return ap


def _first_line(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


def _list(kind: Optional[str], pattern: str) -> int:
    from nasreid.errors import RegistryError
    from nasreid.registry import ALL_REGISTRIES

    if kind is not None and kind not in ALL_REGISTRIES:
        raise RegistryError(f"unknown registry {kind!r}; known: {', '.join(ALL_REGISTRIES)}")
    for name, reg in ALL_REGISTRIES.items():
        if kind is not None and name != kind:
            continue
        print(f"{name}:")
        for key in reg.names(pattern):
            print(f"  {key:<18} {_first_line(reg.get(key))}")
    return 0


def _search_summary(run: Path) -> str:
    """A few lines: the genotype with each choice's probability, and the retrain's results if any."""
    from nasreid.genotype import Genotype

    geno = Genotype.load(run / "genotype.json")
    lines = [f"search run: {run}", geno.summary()]
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    retrain = metrics.get("retrain_run")
    if retrain and (Path(retrain) / "metrics.json").is_file():
        lines.append(f"retrain run: {retrain}")
        ev = json.loads((Path(retrain) / "metrics.json").read_text()).get("evaluation", {})
        for key, r in ev.items():
            lines.append(f"  {key}: rank-1 {r['rank1']:.2f}  mAP {r['mAP']:.2f}  mINP {r.get('mINP', float('nan')):.2f}")
    lines.append(f"genotype: {run / 'genotype.json'}   plots: nasreid plot {run}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``nasreid`` console script. Returns 0 on success and 2 on a user error
    (bad recipe, genotype, dataset or run folder), printed as one ``nasreid <command>: error: ...`` line."""
    args = build_parser().parse_args(argv)
    from nasreid.errors import NasreidError

    try:
        from nasreid.engine import pipeline
        from nasreid.genotype import preset_genotype
        from nasreid.registry import load_plugins

        load_plugins(getattr(args, "plugin", []) or [])
        if args.command == "list":
            return _list(args.kind, args.pattern)
        if args.command == "search":
            recipe, run_dir = _recipe_and_run(args)
            if args.no_retrain:
                recipe = recipe.model_copy(update={"then_retrain": None})
            run = pipeline.run_search(recipe, run_dir=run_dir, resume=bool(args.resume))
            print(_search_summary(run))
        elif args.command == "hpo":
            recipe, run_dir = _recipe_and_run(args)
            if args.no_retrain:
                recipe = recipe.model_copy(update={"then_retrain": None})
            run = pipeline.run_hpo(recipe, workers=args.workers, run_dir=run_dir, resume=bool(args.resume),
                                   threads=args.threads)
            print(_search_summary(run))
        elif args.command == "hpo-worker":
            n = pipeline.run_hpo_worker(args.run, worker=args.worker, threads=args.threads)
            print(f"worker {args.worker}: {n} trials")
        elif args.command == "derive":
            g = pipeline.derive(args.run, args.out)
            print(g.summary())
            print(f"wrote {Path(args.out or args.run) / 'genotype.json'}")
        elif args.command == "train":
            recipe, run_dir = _recipe_and_run(args)
            geno: Any = args.genotype
            if geno and geno.startswith("preset:"):
                geno = preset_genotype(recipe.space.name, geno.split(":", 1)[1])
            run = pipeline.run_train(recipe, genotype=geno, run_dir=run_dir, resume=bool(args.resume))
            print(f"train run: {run}")
            print(json.dumps(json.loads((run / "metrics.json").read_text()).get("evaluation", {}), indent=2))
        elif args.command == "evaluate":
            res = pipeline.run_evaluate(args.run, targets=_targets(args.target) or None, device=args.device,
                                        same_domain=not args.no_same_domain)
            print(json.dumps(res, indent=2))
        elif args.command == "plot":
            from nasreid.plot import plot_alpha_trajectories

            recipe = pipeline.load_run_recipe(args.run) if (Path(args.run) / "recipe.yaml").is_file() else None
            if recipe is not None and recipe.strategy is not None and recipe.strategy.name == "optuna":
                from nasreid.strategies.optuna_hpo import OptunaStrategy

                files = OptunaStrategy.report(args.run, recipe)["plots"]  # trials.csv + Optuna's plots
            else:
                files = plot_alpha_trajectories(args.run, args.out, formats=tuple(args.format) or ("png", "svg"))
            for f in files:
                print(f)
        return 0
    except NasreidError as e:
        print(f"nasreid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
