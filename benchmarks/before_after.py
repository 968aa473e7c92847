"""Run one benchmark against two revisions of nasreid in the same session, interleaved (before, after, before,
after, ...), and print the figures of both with their ratio after / before -- the check that a refactor made
nothing slower (figures as medians over the rounds, so a drifting machine affects both sides alike).

The benchmark *script* is the one of this checkout; only the library under it changes: the old revision is
checked out into a temporary git worktree and put first on ``PYTHONPATH`` (its ``search_spaces/`` and
``strategies/`` linked into its ``nasreid/`` as the installed package maps them). Figures are read from the
script's output with the regular expressions of :data:`FIGURES`.

    python benchmarks/before_after.py --before 88bbb63 --rounds 4 bench_supernet --skip-unshared
    python benchmarks/before_after.py --before 88bbb63 --rounds 3 bench_eval --json results/benchmarks/x.json

Standard library only (subprocess, statistics, git).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: per benchmark: figure name -> regular expression with one group (a number) on the script's stdout
FIGURES = {
    "bench_supernet": {
        "derived s/step": r"derived \(fixed\)\s+([\d.]+)",
        "supernet hard s/step": r"supernet hard \(shared\)\s+([\d.]+)",
        "supernet soft s/step": r"supernet soft \(shared\)\s+([\d.]+)",
    },
    "bench_cpu_epoch": {
        "finetune open epoch s": r"finetune open epoch: ([\d.]+) s",
        "search open epoch s": r"search open epoch: ([\d.]+) s",
        "evaluation images/s": r"evaluation: ([\d.]+) images/s",
        "torchreid minimal loop s": r"torchreid minimal loop: ([\d.]+) s",
        "nasreid minimal loop s": r"nasreid minimal loop: ([\d.]+) s",
    },
    "bench_eval": {
        "market CMC+mAP s": r"market-sized CMC\+mAP: nasreid ([\d.]+) s",
        "market CMC+mAP s (1 thread)": r"nasreid with 1 torch thread .*?: ([\d.]+) s",
        "msmt evaluate_features s": r"msmt-sized evaluate_features: .*?\| ([\d.]+) s",
        "msmt peak RSS GiB": r"peak RSS ([\d.]+) GiB",
    },
}


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), rev], check=True,
                   capture_output=True)
    for sub in ("search_spaces", "strategies"):  # what the editable install maps into nasreid/
        link = where / "nasreid" / sub
        if not link.exists():
            link.symlink_to(Path("..") / sub)
    return where


def _run(tree: Path, script: str, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    # the script of this checkout, run from the tree so that a script that puts its repository on sys.path
    # (bench_eval) still finds the tree's library first
    code = (f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); sys.argv = [{script!r}] + {args!r}; "
            f"runpy.run_path({str(REPO / 'benchmarks' / (script + '.py'))!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        raise SystemExit(f"{script} failed in {tree}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision of the baseline (e.g. a commit hash)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side, interleaved")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("benchmark", choices=sorted(FIGURES))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark script")
    a = ap.parse_args(argv)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before = _worktree(a.before, Path(tmp) / "before")
        try:
            figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
            for r in range(a.rounds):
                for side, tree in (("before", before), ("after", REPO)):
                    out = _run(tree, a.benchmark, a.args)
                    for name, rx in FIGURES[a.benchmark].items():
                        m = re.search(rx, out)
                        if m:
                            figures[side].setdefault(name, []).append(float(m.group(1)))
                    print(f"round {r + 1}/{a.rounds} {side} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    print(f"{a.benchmark} {' '.join(a.args)}: before {a.before} vs after {head} (this checkout, uncommitted "
          f"changes included), {a.rounds} interleaved rounds, medians [min, max]")
    rows = {}
    for name in FIGURES[a.benchmark]:
        b, f = figures["before"].get(name), figures["after"].get(name)
        if not b or not f:
            continue
        mb, mf = statistics.median(b), statistics.median(f)
        rows[name] = {"before": b, "after": f, "ratio_after_over_before": mf / mb}
        print(f"  {name:<30} before {mb:8.4f} [{min(b):.4f}, {max(b):.4f}]  after {mf:8.4f} [{min(f):.4f}, "
              f"{max(f):.4f}]  after/before {mf / mb:.3f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"benchmark": a.benchmark, "args": a.args, "before": a.before,
                                            "after": head, "rounds": a.rounds, "figures": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
