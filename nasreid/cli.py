"""Command line: ``nasreid search | hpo | derive | train | evaluate | plot | export | visualize | profile | rank |
list``.

    nasreid search recipes/osnet_ain.yaml              # one-shot search, writes results/<run>/
    nasreid derive results/<run>                       # genotype.json (+ GraphML) from the last checkpoint
    nasreid derive results/<run> --top-k 5             # gumbel: the best on validation of the 5 most probable
    nasreid train recipes/osnet_ain_retrain.yaml --genotype results/<run>/genotype.json
    nasreid evaluate results/<retrain-run> [--target market1501=/data/market1501]
    nasreid plot results/<run>                         # architecture-weight trajectories (PNG/SVG)
    nasreid hpo recipes/rmgl_cpu.yaml --workers 2      # Optuna study shared by 2 worker processes
    nasreid export results/<retrain-run> --format onnx  # model.onnx + parity on real images of its dataset
    nasreid visualize results/<retrain-run> --queries 10 # ranked lists as PNG (green/red: true/false match)
    nasreid profile preset:osnet_ain --space osnet_ain  # params, multiply-adds, latency (batch 1 and 64)
    nasreid evaluate RUN --matcher qaconv --post tlift # a learned matcher / post-processors instead of the recipe's
    nasreid match RUN --query 0 --gallery 5            # QAConv score + local correspondences picture
    nasreid search recipe.yaml --nproc 2               # data-parallel (torchrun) on this machine
    nasreid rank results/<search-run> --sample 20 --bn-batches 10  # candidates scored with the supernet
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
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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


def _named(spec: str):
    """``name[:k=v,k=v]`` -> NamedConfig (values YAML-typed)."""
    from nasreid.config import NamedConfig

    name, _, kw = spec.partition(":")
    kwargs = {}
    for item in filter(None, kw.split(",")):
        k, _, v = item.partition("=")
        kwargs[k] = yaml.safe_load(v)
    return NamedConfig(name=name, kwargs=kwargs)


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
    """The ``nasreid`` argument parser (one sub-command per entry of :data:`COMMANDS`)."""
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
    s.add_argument("--nproc", type=int, metavar="N", help="data-parallel over N processes on this machine "
                   "(runs torchrun --standalone --nproc_per_node N; gloo on CPU, NCCL on GPUs)")

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
    d.add_argument("--top-k", type=int, metavar="K", help="gumbel: score the K most probable genotypes under the final "
                   "softmax(pi) on the run's validation identities (data.val_ids) with the supernet's weights and "
                   "derive the best (RUN/derive_top_k.csv); default: argmax pi")
    d.add_argument("--bn-batches", type=int, metavar="N", help="with --top-k: training batches of BN recalibration "
                   "per genotype (default: the recipe's validate_bn_batches, 10)")

    t = sub.add_parser("train", parents=[plugin], help="retrain a fixed network from a genotype and evaluate it")
    t.add_argument("recipe", nargs="?", help="retrain recipe YAML (omit with --resume)")
    t.add_argument("--genotype", help="genotype.json, or preset:<name> (e.g. preset:osnet_ain)")
    t.add_argument("--out", help="run folder")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--nproc", type=int, metavar="N", help="data-parallel over N processes (see search --nproc)")

    e = sub.add_parser("evaluate", parents=[plugin], help="CMC / mAP of a retrained run, same- and cross-domain; "
                       "or of a weights file with no run folder (--weights, zero-shot)")
    e.add_argument("run", nargs="?", help="a retrain run folder (omit with --weights)")
    e.add_argument("--weights", help="zero-shot: a weights file (a torchreid model-zoo file, nasreid's model.pt, "
                   "...) evaluated with --genotype on the --target datasets, no run folder")
    e.add_argument("--genotype", help="with --weights: genotype.json or preset:NAME (e.g. preset:osnet)")
    e.add_argument("--space", default="osnet_ain", help="with --weights: the space of a preset (osnet_ain)")
    e.add_argument("--format", dest="weights_format", default="auto",
                   help="with --weights: the file's naming, a registered weights format (nasreid list formats; "
                   "default auto: the format that recognises the file)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --weights: evaluation settings, e.g. space.kwargs.width_mult=0.25, data.height=128, "
                   "data.width=64, eval.metric=cosine (defaults 256x128, euclidean); with a run folder: evaluation "
                   "keys only (eval.*, data.workers, data.on_corrupt, device), results tagged with them")
    e.add_argument("--out", help="with --weights: folder for recipe.yaml and metrics.json")
    e.add_argument("--target", action="append", default=[], metavar="NAME[=ROOT][:k=v,...]",
                   help="cross-domain dataset (repeatable); default: the recipe's eval.targets")
    e.add_argument("--no-same-domain", action="store_true", help="skip the training dataset's test split")
    e.add_argument("--device", help="override the recipe's device")
    e.add_argument("--matcher", metavar="NAME[:k=v,...]", help="a registered matcher instead of the recipe's, "
                   "e.g. qaconv:block_size=128 (a run trained with training.method qaconv)")
    e.add_argument("--post", action="append", default=None, metavar="NAME[:k=v,...]",
                   help="row post-processors instead of the recipe's, in order (repeatable), e.g. rerank, "
                   "tlift:preset=public_code")

    p = sub.add_parser("plot", help="plot architecture-weight trajectories of a search run (an HPO run: Optuna's "
                       "history, intermediate values, importances / Pareto front)")
    p.add_argument("run")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--format", action="append", default=[], choices=["png", "svg", "pdf"])

    x = sub.add_parser("export", parents=[plugin], help="export a retrained network (ONNX) with a parity check "
                       "on real images of its dataset")
    x.add_argument("run")
    x.add_argument("--format", default="onnx", choices=["onnx"])
    x.add_argument("--out", help="model file (default: RUN/export/model.onnx)")
    x.add_argument("--opset", type=int, help="ONNX opset (default: the newest both onnx and torch's exporter know)")
    x.add_argument("--queries", type=int, default=64, help="query images of the parity check (gallery: 4x)")
    x.add_argument("--no-parity", action="store_true", help="skip the parity check")
    x.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="torch.export-based exporter (default) or the legacy TorchScript one")

    v = sub.add_parser("visualize", parents=[plugin], help="ranked lists: each query with its top-k gallery "
                       "images, green/red borders for true/false matches (PNG)")
    v.add_argument("run")
    v.add_argument("--queries", type=int, default=10, help="number of queries (drawn with --seed)")
    v.add_argument("--topk", type=int, default=10)
    v.add_argument("--query-id", type=int, action="append", default=[], metavar="I",
                   help="this query index (repeatable) instead of random ones")
    v.add_argument("--target", metavar="NAME[=ROOT][:k=v,...]", help="a cross-domain dataset instead of the "
                   "run's own test split")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", help="output folder (default: RUN/ranks)")
    v.add_argument("--device", help="override the recipe's device")

    mt = sub.add_parser("match", parents=[plugin], help="QAConv score of one query/gallery pair and a picture of "
                        "their strongest local correspondences (a run trained with training.method qaconv)")
    mt.add_argument("run")
    mt.add_argument("--query", type=int, required=True, help="index into the query list")
    mt.add_argument("--gallery", type=int, required=True, help="index into the gallery list")
    mt.add_argument("--top", type=int, default=12, help="correspondences to draw")
    mt.add_argument("--target", metavar="NAME[=ROOT][:k=v,...]", help="a cross-domain dataset instead of the run's")
    mt.add_argument("--out", help="PNG path (default: RUN/match/q<query>_g<gallery>.png)")
    mt.add_argument("--device")

    pr = sub.add_parser("profile", parents=[plugin], help="parameters, multiply-adds and measured latency of a "
                        "genotype (CPU, and GPU when there is one)")
    pr.add_argument("target", help="genotype.json, preset:NAME (with --space) or a run folder")
    pr.add_argument("--space", help="search space of a preset (e.g. osnet_ain)")
    pr.add_argument("--height", type=int)
    pr.add_argument("--width", type=int)
    pr.add_argument("--batch", type=int, action="append", default=[], help="batch size (repeatable; default 1, 64)")
    pr.add_argument("--device", action="append", default=[], help="cpu / cuda (repeatable; default: cpu + cuda "
                    "when available)")
    pr.add_argument("--iters", type=int, default=10, help="timed runs per setting")
    pr.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA")
    pr.add_argument("--channels-last", action="store_true", help="channels_last on CUDA")
    pr.add_argument("--json", help="also write the report to this JSON file")

    rk = sub.add_parser("rank", parents=[plugin], help="score candidates with a one-shot search run's supernet "
                        "(inherited weights, BN recalibrated): validation rank-1 / mAP, training loss, arch log-prob")
    rk.add_argument("run", help="a one-shot search run folder (gumbel, random, darts_tcm ...) with data.val_ids")
    pick = rk.add_mutually_exclusive_group(required=True)
    pick.add_argument("--genotypes", metavar="FILE", help="JSON/YAML list of preset names (preset:NAME or NAME), "
                      "genotype.json paths (relative to FILE) or {label: value} dicts; or one genotype.json")
    pick.add_argument("--sample", type=int, metavar="N", help="N distinct uniformly drawn candidates (with --seed)")
    pick.add_argument("--all", action="store_true", help="every candidate of the space (its size and the "
                      "estimated time are printed first)")
    rk.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    rk.add_argument("--bn-batches", type=int, default=10, metavar="K", help="training batches of BN "
                    "recalibration per candidate (default 10; 0 = the supernet's statistics)")
    rk.add_argument("--loss-batches", type=int, default=2, metavar="L", help="batches of the training loss "
                    "(default 2)")
    rk.add_argument("--batch-size", type=int, help="images per batch (default: the recipe's data.batch_size)")
    rk.add_argument("--out", help="output folder (default: RUN/rank)")
    rk.add_argument("--device", help="override the recipe's device (cpu, cuda)")

    ip = sub.add_parser("interpolate", parents=[plugin], help="WiSE-FT: evaluate weight-space mixes (1 - alpha) * "
                        "init + alpha * fine-tuned of a retrain run started from model.pretrained (same- and "
                        "cross-domain curve over alpha; resumable)")
    ip.add_argument("run", help="a retrain run folder whose recipe names model.pretrained")
    ip.add_argument("--alpha", default="0,0.25,0.5,0.75,1", metavar="A,B,...|START:STOP:STEP",
                    help="mixing coefficients in [0, 1] (0: the pretrained init, 1: the fine-tuned run); a comma "
                    "list or an inclusive range, e.g. 0:1:0.1 (default 0,0.25,0.5,0.75,1)")
    ip.add_argument("--target", action="append", default=[], metavar="NAME[=ROOT][:k=v,...]",
                    help="cross-domain dataset (repeatable); default: the recipe's eval.targets")
    ip.add_argument("--no-same-domain", action="store_true", help="skip the training dataset's test split")
    ip.add_argument("--out", help="output folder (default: RUN/wise_ft)")
    ip.add_argument("--device", help="override the recipe's device (cpu, cuda)")

    st = sub.add_parser("study", help="does the search beat random and hand design? searches, retrains and a "
                        "paired report over seeds and splits (resumable)")
    st.add_argument("recipe", help="study recipe YAML (see recipes/study_osnet_ain_cpu.yaml), or a study folder")
    st.add_argument("--workers", type=int, help="local worker processes (default: the recipe's workers)")
    st.add_argument("--print-commands", action="store_true",
                    help="print one command per pending job, phase by phase (for SLURM or any job queue)")
    st.add_argument("--all", action="store_true", help="with --print-commands: also the finished jobs")
    st.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    st.add_argument("--report-only", action="store_true", help="only (re)build study_report.md from finished jobs")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study-recipe key")

    ls = sub.add_parser("list", parents=[plugin], help="print what is registered (spaces, strategies, ...)")
    ls.add_argument("kind", nargs="?", help="one registry: spaces, strategies, datasets, losses, matchers, "
                    "postprocessors, methods, augmentations, formats (weights files), presets (default: all)")
    ls.add_argument("pattern", nargs="?", default="*", help="shell pattern on the names, e.g. 'osnet*'")
    return ap


def _first_line(obj) -> str:
    own = getattr(obj, "doc", None)  # a registered record with its own line (a weights format), else the docstring
    doc = ((own if isinstance(own, str) and own else getattr(obj, "__doc__", None)) or "").strip().splitlines()
    return doc[0] if doc else ""


def _list(kind: Optional[str], pattern: str) -> int:
    from nasreid.errors import RegistryError
    from nasreid.models.weights import WEIGHT_FORMATS
    from nasreid.registry import ALL_REGISTRIES

    registries = {**ALL_REGISTRIES, "formats": WEIGHT_FORMATS}
    if kind == "presets":  # the named architectures registered with each space
        from nasreid.registry import SPACES, space_presets

        print("presets:")
        for space in SPACES.names():
            for key in sorted(space_presets(space)):
                if not fnmatch.fnmatch(key, pattern):
                    continue
                preset = space_presets(space)[key]
                kw = preset.get("space_kwargs") or {}
                about = preset.get("doc") or ", ".join(f"{k}={v}" for k, v in kw.items())
                print(f"  {space + ':' + key:<30} {about}".rstrip())
        return 0
    if kind is not None and kind not in registries:
        raise RegistryError(f"unknown registry {kind!r}; known: {', '.join(registries)}, presets")
    for name, reg in registries.items():
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
            lines.append(f"  {key}: rank-1 {r['rank1']:.2f}  mAP {r['mAP']:.2f}  "
                         f"mINP {r.get('mINP', float('nan')):.2f}")
    lines.append(f"genotype: {run / 'genotype.json'}   plots: nasreid plot {run}")
    return "\n".join(lines)


def _torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this command under ``torchrun --standalone --nproc_per_node nproc`` (one machine; torchrun
    picks a free port) without ``--nproc``; returns torchrun's exit status."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nasreid", *rest]
    print("running: " + " ".join(cmd[2:]), file=sys.stderr)
    return subprocess.call(cmd)


# ---- one handler per command: (parsed args) -> exit status ---------------------------------------
def _cmd_list(args) -> int:
    return _list(args.kind, args.pattern)


def _cmd_study(args) -> int:
    from nasreid import study as S

    srec = S.load_study(args.recipe, _overrides(args.set))
    if args.print_commands:  # a ranking study's selection is fixed there once its pool is scored
        S.print_commands(srec, pending_only=not args.all)
    elif args.report_only:
        print(S.build_report(srec))
    else:
        res = S.run_study(srec, workers=args.workers, dry_run=args.dry_run, echo=print)
        print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in res.items()}, indent=2,
                         default=str))
        if res.get("failed"):
            return 1
    return 0


def _cmd_search(args) -> int:
    from nasreid.engine import pipeline

    recipe, run_dir = _recipe_and_run(args)
    if args.no_retrain:
        recipe = recipe.model_copy(update={"then_retrain": None})
    run = pipeline.run_search(recipe, run_dir=run_dir, resume=bool(args.resume))
    if _is_main():
        print(_search_summary(run))
    return 0


def _cmd_hpo(args) -> int:
    from nasreid.strategies.hpo_workers import run_hpo

    recipe, run_dir = _recipe_and_run(args)
    if args.no_retrain:
        recipe = recipe.model_copy(update={"then_retrain": None})
    run = run_hpo(recipe, workers=args.workers, run_dir=run_dir, resume=bool(args.resume), threads=args.threads)
    print(_search_summary(run))
    return 0


def _cmd_hpo_worker(args) -> int:
    from nasreid.strategies.hpo_workers import run_hpo_worker

    n = run_hpo_worker(args.run, worker=args.worker, threads=args.threads)
    print(f"worker {args.worker}: {n} trials")
    return 0


def _cmd_derive(args) -> int:
    from nasreid.engine import pipeline

    if args.bn_batches is not None and args.top_k is None:
        from nasreid.config import RecipeError

        raise RecipeError("--bn-batches needs --top-k K")
    g = pipeline.derive(args.run, args.out, top_k=args.top_k, bn_batches=args.bn_batches)
    print(g.summary())
    print(f"wrote {Path(args.out or args.run) / 'genotype.json'}")
    return 0


def _cmd_train(args) -> int:
    from nasreid.engine import pipeline
    from nasreid.genotype import preset_genotype

    recipe, run_dir = _recipe_and_run(args)
    geno: Any = args.genotype
    if geno and geno.startswith("preset:"):
        geno = preset_genotype(recipe.space.name, geno.split(":", 1)[1])
    run = pipeline.run_train(recipe, genotype=geno, run_dir=run_dir, resume=bool(args.resume))
    if _is_main():
        print(f"train run: {run}")
        print(json.dumps(json.loads((run / "metrics.json").read_text()).get("evaluation", {}), indent=2))
    return 0


def _cmd_evaluate(args) -> int:
    from nasreid.config import RecipeError
    from nasreid.evaluation.runner import run_evaluate, run_evaluate_weights

    if args.weights:
        if args.run or not args.genotype:
            raise RecipeError("nasreid evaluate --weights FILE needs --genotype (genotype.json or preset:NAME) and "
                              "no run folder")
        run = run_evaluate_weights(args.weights, args.genotype, targets=_targets(args.target), space=args.space,
                                   overrides=_overrides(args.set), out=args.out, weights_format=args.weights_format,
                                   device=args.device)
        print(f"zero-shot run: {run}")
        print(json.dumps(json.loads((run / "metrics.json").read_text())["evaluation"], indent=2))
        return 0
    if not args.run:
        raise RecipeError("nasreid evaluate: give a run folder, or --weights FILE --genotype G --target ...")

    res = run_evaluate(args.run, targets=_targets(args.target) or None, device=args.device,
                       same_domain=not args.no_same_domain,
                       matcher=_named(args.matcher) if args.matcher else None,
                       postprocessors=[_named(p) for p in args.post] if args.post else None,
                       overrides=_overrides(args.set))
    print(json.dumps(res, indent=2))
    return 0


def _cmd_plot(args) -> int:
    """A search run: its strategy's plots (``Strategy.plot_run``: alpha trajectories, or an Optuna study's
    report); a folder without a search recipe (an ``alphas.csv`` alone): the alpha trajectories."""
    from nasreid.engine.runs import load_run_recipe
    from nasreid.plot import plot_alpha_trajectories

    formats = tuple(args.format) or ("png", "svg")
    recipe = load_run_recipe(args.run) if (Path(args.run) / "recipe.yaml").is_file() else None
    if recipe is not None and recipe.strategy is not None:
        from nasreid.registry import STRATEGIES, load_plugins

        if recipe.plugins:  # the strategy may be a plugin's
            load_plugins(recipe.plugins, Path(recipe.source).parent if recipe.source else None)
        files = STRATEGIES.get(recipe.strategy.name).plot_run(args.run, recipe, out=args.out, formats=formats)
    else:
        files = plot_alpha_trajectories(args.run, args.out, formats=formats)
    for f in files:
        print(f)
    return 0


def _cmd_export(args) -> int:
    from nasreid.export import run_export

    rep = run_export(args.run, fmt=args.format, out=args.out, opset=args.opset, parity=not args.no_parity,
                     num_query=args.queries, num_gallery=4 * args.queries, exporter=args.exporter)
    print(json.dumps(rep, indent=2, default=str))
    if rep.get("parity") is not None and not rep["parity"]["passed"]:
        print(f"nasreid export: parity check FAILED (see {rep.get('parity_path')})", file=sys.stderr)
        return 1
    return 0


def _cmd_visualize(args) -> int:
    from nasreid.visualize import visualize_ranks

    files = visualize_ranks(args.run, queries=args.queries, topk=args.topk, out=args.out,
                            target=_targets([args.target])[0] if args.target else None, seed=args.seed,
                            device=args.device, query_ids=args.query_id or None)
    for f in files:
        print(f)
    return 0


def _cmd_match(args) -> int:
    from nasreid.visualize import match_pair

    rep = match_pair(args.run, args.query, args.gallery, out=args.out, top=args.top,
                     target=_targets([args.target])[0] if args.target else None, device=args.device)
    print(json.dumps({k: v for k, v in rep.items() if k != "correspondences"}, indent=2))
    return 0


def _cmd_profile(args) -> int:
    from nasreid.profile import format_profile, profile_network

    size = None if args.height is None and args.width is None else (args.height, args.width)
    rep = profile_network(args.target, space=args.space, input_size=size,
                          batch_sizes=tuple(args.batch) or (1, 64), devices=args.device or None,
                          iters=args.iters, amp=args.amp, channels_last=args.channels_last)
    print(format_profile(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, default=str) + "\n")
    return 0


def _cmd_rank(args) -> int:
    from nasreid.ranking import rank_run

    rank_run(args.run, genotypes=args.genotypes, sample=args.sample, seed=args.seed, all_candidates=args.all,
             bn_batches=args.bn_batches, loss_batches=args.loss_batches, batch_size=args.batch_size, out=args.out,
             device=args.device)
    return 0


def _cmd_interpolate(args) -> int:
    from nasreid.evaluation.wise_ft import parse_alphas, run_wise_ft

    alphas = parse_alphas(args.alpha, "--alpha")
    out = run_wise_ft(args.run, alphas, targets=_targets(args.target) or None, out=args.out,
                      same_domain=not args.no_same_domain, device=args.device)
    print((out / "wise_ft.md").read_text())
    print(f"wrote {out / 'wise_ft.csv'}, {out / 'wise_ft.md'}, {out / 'wise_ft.png'}")
    return 0


#: sub-command -> handler (every sub-command of :func:`build_parser` has one)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "search": _cmd_search, "hpo": _cmd_hpo, "hpo-worker": _cmd_hpo_worker, "derive": _cmd_derive,
    "train": _cmd_train, "evaluate": _cmd_evaluate, "plot": _cmd_plot, "export": _cmd_export,
    "visualize": _cmd_visualize, "match": _cmd_match, "profile": _cmd_profile, "study": _cmd_study,
    "rank": _cmd_rank, "interpolate": _cmd_interpolate, "list": _cmd_list,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``nasreid`` console script. Returns the command's status (0 on success; 1 for a
    failed export parity check or failed study jobs) and 2 on a user error (bad recipe, genotype, dataset or
    run folder), printed as one ``nasreid <command>: error: ...`` line. Under ``torchrun`` (``search`` /
    ``train``), rank 0 alone prints the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", None):
        if args.nproc < 1:
            raise SystemExit("--nproc must be >= 1")
        if args.nproc > 1:
            return _torchrun(args.nproc, argv)
    from nasreid.errors import NasreidError

    try:
        from nasreid.registry import load_plugins

        load_plugins(getattr(args, "plugin", []) or [])
        return COMMANDS[args.command](args)
    except NasreidError as e:
        from nasreid.engine.runs import discard_new_runs

        discard_new_runs()  # an input error leaves no run folder behind
        print(f"nasreid {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        from nasreid.engine.distributed import shutdown

        shutdown()


def _is_main() -> bool:
    from nasreid.engine.distributed import is_main

    return is_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
