"""The local runner of a study: :func:`run_study` runs every unfinished job's plain CLI command, phase by phase,
from a pool of worker processes, each job's output appended to its ``job.log``, and builds the report at the end;
:func:`print_commands` lists the same commands for an external scheduler."""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Union

from nasreid.config import RecipeError

from .jobs import DONE, EVALUATE, PHASES, StudyJob, _as_study, enumerate_jobs
from .ranking import selection_pending
from .report import build_report
from .schema import StudyRecipe


def _run_job(job: StudyJob, env: Mapping[str, str]) -> dict:
    """Run one job's command with its output appended to ``<run>/job.log``; the job's record. A train job that
    still lacks an evaluation afterwards (state ``evaluate``: a methods study's extra evaluations, one ``nasreid
    evaluate RUN --set ...`` each) gets the next command at once, as long as each succeeds and changes the
    command."""
    state = job.state()
    job.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    done: list[list[str]] = []
    with open(job.run_dir / "job.log", "a") as fh:
        now, rc = state, 0
        while True:
            cmd = job.command(now)
            fh.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')} ({now}) $ {shlex.join(cmd)}\n")
            fh.flush()
            t1 = time.time()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(env), check=False).returncode
            fh.write(f"# exit {rc} after {time.time() - t1:.1f} s\n")
            done.append(cmd)
            now = job.state()
            if rc != 0 or now != EVALUATE or job.command(now) in done:
                break
    return {"id": job.id, "state_before": state, "rc": rc, "seconds": time.time() - t0,
            "state": job.state(), "log": str(job.run_dir / "job.log")}


def print_commands(recipe: Union[StudyRecipe, str, os.PathLike], pending_only: bool = True,
                   file=None) -> list[str]:
    """Print one shell command per job, phase by phase (``# phase 1: search`` / ``# phase 2: train`` comment
    lines between them), for an external scheduler: every command of a phase may run in parallel, and a
    phase starts when the previous one is finished. Each command is resumable: a job interrupted after
    this was printed is best re-listed (its command then carries ``--resume``). A ranking study's score and
    ranked train jobs appear once its selection is fixed: listing fixes it when the pool is scored
    (:func:`nasreid.study.ranking.selection_pending`, as :func:`run_study` does).

    Args:
        recipe: a :class:`StudyRecipe`, a study YAML file or a study folder.
        pending_only: skip finished jobs (default); ``False`` lists every job.
        file: where to print (default ``sys.stdout``).

    Returns:
        The printed commands (without the comment lines).
    """
    file = file or sys.stdout
    study = _as_study(recipe)
    if study.ranking is not None:
        selection_pending(study)
    jobs = enumerate_jobs(study)
    out = []
    phases = [ph for ph in PHASES if ph in ("search", "train") or any(j.phase == ph for j in jobs)]
    for i, phase in enumerate(phases, 1):
        sel = [j for j in jobs if j.phase == phase]
        cmds = []
        for j in sel:
            st = j.state()
            if pending_only and st == DONE:
                continue
            cmds.append(shlex.join(j.command(st)))
        print(f"# phase {i}: {phase} ({len(cmds)} of {len(sel)} jobs" + (" pending)" if pending_only else ")"),
              file=file)
        for c in cmds:
            print(c, file=file)
        out += cmds
    return out


def run_study(recipe: Union[StudyRecipe, str, os.PathLike], workers: Optional[int] = None, dry_run: bool = False,
              report: bool = True, echo: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run every unfinished job of a study with ``workers`` local processes, phase by phase.

    Finished jobs are skipped; started ones are resumed (``--resume``); a retrain whose search failed is
    skipped (``blocked``). Each job is a ``subprocess.run`` of its plain CLI command (:meth:`StudyJob.command`)
    driven from a ``concurrent.futures`` pool, its output appended to ``<run>/job.log``. Every job gets
    ``NASREID_NO_PROGRESS=1`` and, unless already set, ``OMP_NUM_THREADS`` = CPU cores // workers and
    ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning: on 2 cores, two processes that spin
    their threads -- a study job beside a test run or a second worker -- slowed each other 7-11x). Writes
    ``study.yaml`` into the study folder and, with ``report``, builds the report at the end (with whatever
    finished).

    Args:
        recipe: a :class:`StudyRecipe`, a study YAML file or a study folder.
        workers: parallel jobs (default: the recipe's ``workers``).
        dry_run: print the pending commands (:func:`print_commands`) and run nothing.
        report: build the report after the last phase.
        echo: progress lines (default: printed to stderr).

    Returns:
        ``{"skipped": [ids done before], "ran": [job records], "failed": [records with rc != 0 or not done
        after running], "blocked": [ids], "report": path of study_report.md or None}``.

    Raises:
        RecipeError: an invalid study recipe.
    """
    study = _as_study(recipe)
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    workers = int(workers or study.workers)
    if workers < 1:
        raise RecipeError(f"workers must be >= 1, got {workers}")
    if dry_run:
        print_commands(study)
        return {"skipped": [], "ran": [], "failed": [], "blocked": [], "report": None}
    study.study_dir.mkdir(parents=True, exist_ok=True)
    (study.study_dir / "study.yaml").write_text(study.model_copy(update={"source": None}).to_yaml())
    env = dict(os.environ)
    env["NASREID_NO_PROGRESS"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out: dict[str, Any] = {"skipped": [], "ran": [], "failed": [], "blocked": [], "report": None}
    i = 0
    for phase in PHASES:
        if phase == "score" and study.ranking is not None:
            selection_pending(study)  # fix each split's selection once its pool is scored (never rewritten)
        jobs = enumerate_jobs(study)  # anew each phase: a ranking study's train jobs follow its selection
        if phase in ("pool", "score", "zero_shot") and not any(j.phase == phase for j in jobs):
            continue
        i += 1
        todo = []
        for j in (j for j in jobs if j.phase == phase):
            if j.state() == DONE:
                out["skipped"].append(j.id)
            elif not j.ready():
                out["blocked"].append(j.id)
            else:
                todo.append(j)
        echo(f"study {study.name}: phase {i} ({phase}): {len(todo)} jobs to run with {workers} workers")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for rec in pool.map(lambda j: _run_job(j, env), todo):
                out["ran"].append(rec)
                ok = rec["rc"] == 0 and rec["state"] == DONE
                if not ok:
                    out["failed"].append(rec)
                echo(f"  {'done' if ok else 'FAILED'} {rec['id']} ({rec['state_before']}, {rec['seconds']:.0f} s"
                     + ("" if ok else f", exit {rec['rc']}, see {rec['log']}") + ")")
    if out["blocked"]:
        echo(f"study {study.name}: {len(out['blocked'])} retrains not run (their search did not finish)")
    if report:
        out["report"] = str(build_report(study))
        echo(f"study {study.name}: report {out['report']}")
    return out
