"""Single Path One-Shot search (Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform Sampling",
ECCV 2020): a supernet trained with one uniformly sampled path per step, then an evolutionary search over
genotypes scored on validation identities with the supernet's inherited weights.

1. **Supernet training** (Sec. 3.2, Eq. 4-5): ``W_A = argmin_W E_{a ~ Gamma(A)} [L_train(N(a, W(a)))]`` with
   ``Gamma(A)`` uniform over the space: every step samples one candidate per choice uniformly and updates the
   weights of that single path. This is :class:`~nasreid.strategies.random.RandomStrategy`'s training (its
   :class:`~nasreid.strategies.random.UniformPathOp` and ``train_step``, reused by subclassing) run by the shared
   one-shot loop (:meth:`~nasreid.strategies.base.OneShotStrategy.train_supernet`: checkpoints, ``--resume``, warm
   start, frozen epochs).
2. **Scoring a candidate** (Sec. 3.3): the fixed network of the candidate inherits the supernet's weights, its BN
   statistics are recalibrated on ``bn_batches`` fixed training batches, and it is evaluated on the recipe's
   validation identities (``data.val_ids``; the test split is never read) -- :class:`nasreid.ranking.SupernetRanker`
   on the trained supernet in memory, as ``nasreid rank`` scores it.
3. **Evolutionary search** (Sec. 3.4, Algorithm 1): a population ``P_0`` of ``population`` distinct uniform samples;
   for ``i = 1..T`` (``iterations``): score ``P_{i-1}`` on validation, ``TopK`` := the ``parents`` best candidates
   scored so far, ``P_i`` := ``crossover`` children of two random parents of ``TopK`` (each choice from either
   parent, probability 1/2) and ``mutation`` children of one random parent (each choice resampled uniformly with
   probability ``mutation_prob``). As in the authors' code (``vis_dict``), a child already scored or already in
   ``P_i`` is rejected and drawn again (at most ``10 n`` tries for ``n`` children), so no candidate is scored twice,
   and ``P_i`` is filled up to ``population`` with distinct uniform samples. The result is the best of ``TopK``.
   Algorithm 1's constraint set ``C`` is here ``fixed`` (choices held at a value; nothing else, no FLOPs bound).
   When the (constrained) space holds at most ``exhaustive_max`` candidates, every candidate is scored instead.

Files in the run folder:

* ``evolution.csv``: one row per scored candidate, appended (and fsynced) as it is scored: ``key`` (values in label
  order, :func:`nasreid.ranking.genotype_key`), ``generation`` (0-based; 0 for an exhaustive search), ``source``
  (``init`` / ``crossover`` / ``mutation`` / ``random`` / ``all``), ``choices`` (JSON), ``val_rank1``, ``val_mAP``,
  ``val_mINP`` (percent), ``train_loss`` (``nan`` with ``loss_batches: 0``), ``seconds``.
* ``evolution.json``: the settings, the mode, the next generation to score with its population, the state of the
  evolution's own random generator (saved after every generation), the values of every choice and, once done,
  the summary.

Resume (``nasreid search --resume RUN``): a run killed while training resumes training from its checkpoint; a run
killed during the evolution reloads the finished supernet from ``checkpoints/last.pt``, reads the rows and the state
back and scores only what is missing; scores are deterministic (fixed BN batches, eval mode), so it ends with the
genotype and rows of an uninterrupted run.

Cost on 2 CPU cores at 256x128 (OSNet-AIN x0.25, 100 validation identities, ``bn_batches: 10``): about 3.7 s per
candidate, so the default 16 x 5 = 80 candidates take about 5 min after the supernet's training.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import random as _random
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nasreid.config import RecipeError
from nasreid.genotype import Genotype, GenotypeError
from nasreid.registry import register_strategy

from .base import StrategyConfigError, make_genotype
from .random import RandomStrategy

__all__ = ["SPOSStrategy", "EVOLUTION_CSV", "EVOLUTION_JSON", "read_evolution", "best_row"]

log = logging.getLogger("nasreid")

EVOLUTION_CSV, EVOLUTION_JSON = "evolution.csv", "evolution.json"
SCORES = ("val_rank1", "val_mAP", "val_mINP", "train_loss", "seconds")
FIELDS = ["key", "generation", "source", "choices", *SCORES]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.10g}"
    return str(v)


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return x if math.isfinite(x) else -math.inf


def read_evolution(run_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The complete rows of ``RUN/evolution.csv`` in the order they were scored (``[]`` without the file). A last
    row cut short by a kill (no line end, or missing fields) is dropped."""
    path = Path(run_dir) / EVOLUTION_CSV
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    return [r for r in rows if all(r.get(k) not in (None, "") for k in FIELDS)]


def best_row(rows: Sequence[Mapping[str, str]], score: str) -> tuple[int, Mapping[str, str]]:
    """``(index, row)`` of the best row by ``score`` (``val_mAP`` / ``val_rank1``), ties to the one scored first
    (a non-finite score counts as the worst).

    Raises:
        GenotypeError: no row."""
    if not rows:
        raise GenotypeError("no scored candidate")
    i = min(range(len(rows)), key=lambda j: (-_num(rows[j][score]), j))
    return i, rows[i]


@register_strategy("spos")
class SPOSStrategy(RandomStrategy):
    """Single Path One-Shot NAS (Guo et al., ECCV 2020; see the module docstring for the algorithm and files).

    Kwargs (``strategy.kwargs``):
        seed: seed of the path sampling (training) and of the evolution (default: the recipe's ``seed``).
        population: P, candidates per generation (16; the paper 50).
        iterations: T, generations scored (5; the paper 20).
        parents: k of ``TopK`` (4; the paper 10).
        crossover, mutation: children per generation by crossover / mutation (default ``P // 2`` and
            ``P - P // 2``, the paper's ``n = m = P / 2``).
        mutation_prob: probability of resampling each choice of a mutated child (0.1, the paper's).
        bn_batches: K training batches of BN recalibration per candidate (10; 0: the supernet's statistics).
        loss_batches: batches of the training loss per candidate (0: not computed, ``nan`` in ``evolution.csv``).
        batch_size: images per recalibration batch (default ``data.batch_size``).
        score: ``val_mAP`` (default) or ``val_rank1``, the validation score that selects.
        exhaustive_max: score every candidate instead of evolving when the (constrained) space holds at most this
            many (128).
        fixed: ``{label: value}`` choices held fixed during the selection (Algorithm 1's constraints ``C``); the
            supernet still trains every path.
        fair: train the supernet with FairNAS strict fairness instead of one uniform path per step (see
            :class:`~nasreid.strategies.random.RandomStrategy`).

    ``probabilities()`` is uniform (the sampling distribution ``Gamma(A)`` of Eq. 4) until a candidate is scored,
    then one-hot on the best candidate so far; the genotype's probabilities are one-hot on the selected one.

    Raises:
        StrategyConfigError: invalid kwargs (names ``strategy.kwargs.<key>``), a ``fixed`` label or value the space
            lacks. RecipeError (from :meth:`search`): the recipe sets no ``data.val_ids``.
    """

    name = "spos"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int = 0
        population: int = Field(16, ge=2)
        iterations: int = Field(5, ge=1)
        parents: int = Field(4, ge=1)
        crossover: Optional[int] = Field(None, ge=0)
        mutation: Optional[int] = Field(None, ge=0)
        mutation_prob: float = Field(0.1, ge=0.0, le=1.0)
        bn_batches: int = Field(10, ge=0)
        loss_batches: int = Field(0, ge=0)
        batch_size: Optional[int] = Field(None, ge=2)
        score: Literal["val_mAP", "val_rank1"] = "val_mAP"
        exhaustive_max: int = Field(128, ge=0)
        fixed: dict[str, str] = Field(default_factory=dict)
        fair: bool = False

        @model_validator(mode="after")
        def _counts(self) -> "SPOSStrategy.Config":
            if self.parents > self.population:
                raise ValueError(f"parents ({self.parents}) must not exceed population ({self.population})")
            if (self.crossover or 0) + (self.mutation or 0) > self.population:
                raise ValueError(f"crossover + mutation ({self.crossover} + {self.mutation}) must not exceed "
                                 f"population ({self.population})")
            return self

    cfg: Config  # type: ignore[assignment]  # the validated ``strategy.kwargs`` (set by Strategy.__init__)

    def __init__(self, space, **kwargs: Any):
        super().__init__(space, **kwargs)
        self.values: dict[str, list[Any]] = {label: list(m.values) for label, m in self.choices.items()}
        for label, value in self.cfg.fixed.items():
            if label not in self.values:
                raise StrategyConfigError(f"strategy 'spos': strategy.kwargs.fixed.{label}: the space has no choice "
                                          f"{label!r} (choices: {list(self.values)})")
            if value not in [str(v) for v in self.values[label]]:
                raise StrategyConfigError(f"strategy 'spos': strategy.kwargs.fixed.{label}: {value!r} is not one of "
                                          f"{[str(v) for v in self.values[label]]}")
        #: the values the selection draws from: the fixed value alone for a fixed choice
        self.search_values = {label: ([v for v in vals if str(v) == self.cfg.fixed[label]]
                                      if label in self.cfg.fixed else vals) for label, vals in self.values.items()}
        self.evo_rng = _random.Random(self.cfg.seed * 1_000_003 + 7)
        self._best: Optional[dict[str, Any]] = None

    # ---- what the shared loop and the logs ask ---------------------------------------------------------
    def probabilities(self) -> dict[str, dict[str, float]]:
        """Uniform (``Gamma(A)``, Eq. 4) before any candidate is scored; then one-hot on the best one so far."""
        if self._best is None:
            return {label: {str(v): 1.0 / len(vals) for v in vals} for label, vals in self.values.items()}
        return {label: {str(v): float(str(v) == str(self._best[label])) for v in vals}
                for label, vals in self.values.items()}

    def export(self) -> dict[str, Any]:
        """The best candidate scored so far.

        Raises:
            GenotypeError: nothing scored yet."""
        if self._best is None:
            raise GenotypeError("spos: no candidate scored yet (the evolution has not started)")
        return dict(self._best)

    def state_dict(self) -> dict[str, Any]:
        # the evolution checkpoints itself (evolution.json); this is the training's state
        return {"probabilities": self.probabilities(), "rng": self.rng.getstate(), "sample": self._sample}

    # ---- the search --------------------------------------------------------------------------------------
    def search(self, ctx) -> Genotype:
        """Train the supernet (uniform single paths, Sec. 3.2), then select on validation (Algorithm 1, or every
        candidate of a space of at most ``exhaustive_max``); returns the best candidate's genotype. Under torchrun
        every rank trains the supernet and rank 0 alone runs the selection while the others wait at a barrier (the
        process group's timeout, 30 min by default, bounds the selection's time), then every rank derives the same
        genotype from ``evolution.csv``.

        Raises:
            RecipeError: the recipe sets no ``data.val_ids`` (checked before training).
            RankingError: the dataset holds no validation identities / too few training identities for a batch.
        """
        from nasreid.ranking import SupernetRanker

        if ctx.recipe.data.val_ids is None:
            raise RecipeError(f"{ctx.recipe.source or '<recipe>'}: data.val_ids: strategy 'spos' selects its genotype "
                              "on validation identities held out of training; set data.val_ids (e.g. --set "
                              "data.val_ids=100), the test split is never read")
        t0 = time.time()
        history = self.train_supernet(ctx)
        t_train = time.time() - t0
        assert self.model is not None  # train_supernet attached it
        ranker = SupernetRanker(self.model, self, ctx, bn_batches=self.cfg.bn_batches,
                                loss_batches=self.cfg.loss_batches, batch_size=self.cfg.batch_size)
        if ranker.labels != list(self.values):
            raise StrategyConfigError(f"spos: the supernet's choices {ranker.labels} are not the space's "
                                      f"{list(self.values)}")
        from nasreid.engine import distributed as D

        t1 = time.time()
        train_seconds = sum(float(h.get("epoch_seconds", 0.0)) for h in history)
        if D.is_main():  # under torchrun rank 0 alone scores (one evolution.csv); the ranker runs the bare
            self.evolve(ranker, Path(ctx.run_dir), train_seconds=train_seconds)  # supernet: no collective
        D.barrier()  # the other ranks read the selection from rank 0's files
        t_evo = time.time() - t1
        geno = self.derive(ctx.run_dir, ctx.recipe)
        geno.provenance.update(epoch=len(history), train_wall_seconds_this_process=t_train,
                               evolution_wall_seconds_this_process=t_evo)
        self._best = dict(geno.choices)
        return geno

    def _settings(self, ranker) -> dict[str, Any]:
        c = self.cfg
        return {"population": c.population, "iterations": c.iterations, "parents": c.parents,
                "crossover": self._n_crossover(), "mutation": self._n_mutation(), "mutation_prob": c.mutation_prob,
                "bn_batches": ranker.bn_batches, "loss_batches": ranker.loss_batches, "batch_size": ranker.batch_size,
                "score": c.score, "exhaustive_max": c.exhaustive_max, "fixed": dict(c.fixed), "seed": c.seed,
                "ranker_seed": ranker.seed, "labels": ranker.labels}

    def _n_crossover(self) -> int:
        return self.cfg.population // 2 if self.cfg.crossover is None else self.cfg.crossover

    def _n_mutation(self) -> int:
        return self.cfg.population - self.cfg.population // 2 if self.cfg.mutation is None else self.cfg.mutation

    def space_size(self) -> int:
        """Candidates of the (constrained) space: ``prod_l |values_l|`` (fixed choices count 1)."""
        return math.prod(len(v) for v in self.search_values.values())

    def key(self, sample: Mapping[str, Any]) -> str:
        """:func:`nasreid.ranking.genotype_key` in the space's label order."""
        from nasreid.ranking import genotype_key

        return genotype_key(sample, list(self.values))

    def evolve(self, ranker, run_dir: Path, train_seconds: float = 0.0) -> list[dict[str, str]]:
        """Score candidates with ``ranker`` (a :class:`~nasreid.ranking.SupernetRanker` on the trained supernet)
        into ``run_dir/evolution.csv`` until the selection is complete -- every candidate of a space of at most
        ``exhaustive_max``, else ``iterations`` generations of Algorithm 1 -- resuming from the files already
        there; returns the rows.

        Raises:
            RecipeError: ``evolution.json`` was written with other settings (names the key).
        """
        from nasreid.engine.checkpoint import read_json, write_json

        state_path, csv_path = run_dir / EVOLUTION_JSON, run_dir / EVOLUTION_CSV
        settings = self._settings(ranker)
        state = read_json(state_path)
        if state is not None:
            for k, v in settings.items():
                if state.get("settings", {}).get(k) != v:
                    raise RecipeError(f"{state_path}: settings.{k} is {state.get('settings', {}).get(k)!r} there, "
                                      f"the recipe asks for {v!r}; a resumed selection keeps its settings")
        rows = read_evolution(run_dir)
        if csv_path.is_file():  # rewrite without a row cut short by a kill
            text = csv_path.read_text()
            if (text and not text.endswith("\n")) or sum(1 for _ in csv.DictReader(io.StringIO(text))) != len(rows):
                log.info("spos: %s ended with an incomplete row (a kill while writing it): dropped", csv_path.name)
                self._rewrite(csv_path, rows)
        scored = {r["key"]: r for r in rows}
        if rows:
            self._best = json.loads(best_row(rows, self.cfg.score)[1]["choices"])
            log.info("spos: %d candidates already scored in %s", len(rows), csv_path.name)
        size = self.space_size()
        exhaustive = size <= self.cfg.exhaustive_max
        base = {"settings": settings, "mode": "exhaustive" if exhaustive else "evolution", "space_size": size,
                "values": {k: [str(v) for v in vals] for k, vals in self.values.items()},
                "train_seconds": train_seconds}
        if state is None or "rng" not in state:
            gen = 0
            population = [] if exhaustive else self._fill([], scored, "init")
            state = {**base, "generation": 0, "population": self._dump(population), "rng": self._rng_state()}
            write_json(state_path, state)
        else:
            gen = int(state["generation"])
            population = self._load(state["population"])
            self.evo_rng.setstate(_rng_from_json(state["rng"]))
        new_file = not csv_path.is_file() or csv_path.stat().st_size == 0
        with csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new_file:
                w.writeheader()
                f.flush()

            def score(sample: Mapping[str, Any], generation: int, source: str) -> None:
                key = self.key(sample)
                if key in scored:  # never scored twice (a resumed generation, or a duplicate)
                    return
                res = ranker.score(sample)
                row = {"key": key, "generation": generation, "source": source,
                       "choices": json.dumps(dict(sample), sort_keys=False), **{k: res[k] for k in SCORES}}
                out = {k: _fmt(row[k]) for k in FIELDS}
                w.writerow(out)
                f.flush()
                os.fsync(f.fileno())
                scored[key] = out
                rows.append(out)
                self._best = json.loads(best_row(rows, self.cfg.score)[1]["choices"])
                log.info("spos: %s %s (gen %d, %s): %s %.2f", len(rows), key, generation, source, self.cfg.score,
                         _num(out[self.cfg.score]))

            if exhaustive:
                for vals in itertools.product(*self.search_values.values()):
                    score(dict(zip(self.values, vals)), 0, "all")
                gen = 1
            else:
                while gen < self.cfg.iterations and population:
                    for sample, source in population:
                        score(sample, gen, source)
                    gen += 1
                    population = self._next_population(rows, scored) if gen < self.cfg.iterations else []
                    write_json(state_path, {**base, "generation": gen, "population": self._dump(population),
                                            "rng": self._rng_state()})
                    i, b = best_row(rows, self.cfg.score)
                    log.info("spos: generation %d/%d done: %d candidates scored, best %s %s %.2f", gen,
                             self.cfg.iterations, len(rows), b["key"], self.cfg.score, _num(b[self.cfg.score]))
        summary = {"candidates_scored": len(rows), "scoring_seconds": sum(_num(r["seconds"]) for r in rows),
                   "best_key": best_row(rows, self.cfg.score)[1]["key"] if rows else None}
        write_json(state_path, {**base, "generation": gen, "population": [], "rng": self._rng_state(),
                                "done": True, "summary": summary})
        return rows

    # ---- Algorithm 1's pieces ------------------------------------------------------------------------------
    def _random_sample(self) -> dict[str, Any]:
        return {label: self.evo_rng.choice(vals) for label, vals in self.search_values.items()}

    def _fill(self, pop: list[tuple[dict[str, Any], str]], scored: Mapping[str, Any],
              source: str) -> list[tuple[dict[str, Any], str]]:
        """``pop`` filled up to ``population`` with distinct uniform samples never scored (at most ``10 P`` draws)."""
        keys = {self.key(s) for s, _ in pop}
        for _ in range(10 * self.cfg.population):
            if len(pop) >= self.cfg.population:
                break
            s = self._random_sample()
            k = self.key(s)
            if k not in keys and k not in scored:
                keys.add(k)
                pop.append((s, source))
        return pop

    def _next_population(self, rows: Sequence[Mapping[str, str]], scored: Mapping[str, Any]):
        """``P_i = Crossover(TopK, n) + Mutation(TopK, m, prob)``, filled with uniform samples (Algorithm 1, l. 7-10);
        children already scored or already in ``P_i`` are drawn again (at most ``10 n`` / ``10 m`` tries)."""
        order = sorted(range(len(rows)), key=lambda j: (-_num(rows[j][self.cfg.score]), j))
        topk = [json.loads(rows[j]["choices"]) for j in order[:self.cfg.parents]]
        pop: list[tuple[dict[str, Any], str]] = []
        keys: set[str] = set()
        rng = self.evo_rng

        def add(child: dict[str, Any], source: str) -> None:
            k = self.key(child)
            if k not in keys and k not in scored:
                keys.add(k)
                pop.append((child, source))

        n, m = self._n_crossover(), self._n_mutation()
        tries = 0
        while sum(s == "crossover" for _, s in pop) < n and tries < 10 * n:
            tries += 1
            a, b = rng.sample(topk, 2) if len(topk) >= 2 else (topk[0], topk[0])
            add({label: rng.choice([a[label], b[label]]) for label in self.values}, "crossover")
        tries = 0
        while sum(s == "mutation" for _, s in pop) < m and tries < 10 * m:
            tries += 1
            p = rng.choice(topk)
            add({label: (rng.choice(vals) if len(vals) > 1 and rng.random() < self.cfg.mutation_prob else p[label])
                 for label, vals in self.search_values.items()}, "mutation")
        return self._fill(pop, scored, "random")

    # ---- (de)serialisation --------------------------------------------------------------------------------
    def _rng_state(self) -> list[Any]:
        v, st, g = self.evo_rng.getstate()
        return [v, list(st), g]

    @staticmethod
    def _dump(pop: Sequence[tuple[Mapping[str, Any], str]]) -> list[dict[str, Any]]:
        return [{"choices": dict(s), "source": src} for s, src in pop]

    def _load(self, pop: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        out = []
        for p in pop:
            typed = {}
            for label, v in p["choices"].items():
                typed[label] = next((x for x in self.values[label] if str(x) == str(v)), v)
            out.append((typed, str(p["source"])))
        return out

    @staticmethod
    def _rewrite(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r[k] for k in FIELDS})
        os.replace(tmp, path)

    # ---- derive --------------------------------------------------------------------------------------------
    @classmethod
    def derive(cls, run_dir: str | Path, recipe) -> Genotype:
        """The best-scoring candidate of ``RUN/evolution.csv`` (by the recipe's ``score``, ties to the first scored),
        its provenance: the rule, the score, its generation, the candidates scored, the seconds of training (the
        supernet's epochs) and of scoring, whether the selection was finished.

        Raises:
            GenotypeError: no scored candidate yet (the supernet is still training or the evolution has not begun).
        """
        from nasreid.engine.checkpoint import read_json

        run = Path(run_dir)
        rows = read_evolution(run)
        state = read_json(run / EVOLUTION_JSON) or {}
        if not rows:
            raise GenotypeError(f"{run}: {EVOLUTION_CSV} holds no scored candidate yet (the supernet is still "
                                "training or the evolution has not begun): resume the search (nasreid search "
                                f"--resume {run})")
        kw = dict(recipe.strategy.kwargs) if recipe.strategy is not None else {}
        score = str(state.get("settings", {}).get("score") or kw.get("score") or "val_mAP")
        i, row = best_row(rows, score)
        choices = json.loads(row["choices"])
        values = state.get("values") or {k: [str(v)] for k, v in choices.items()}
        probs = {label: {v: float(v == str(choices[label])) for v in vals} for label, vals in values.items()}
        mode = state.get("mode", "evolution")
        rule = (f"spos: best validation {score} of every candidate of the space (exhaustive, {len(rows)})"
                if mode == "exhaustive" else
                f"spos: best validation {score} of {len(rows)} candidates of an evolutionary search "
                "(Guo et al., ECCV 2020, Algorithm 1)")
        return make_genotype(recipe, choices, probs, run=run.name, rule=rule, score=score,
                             score_value=_num(row[score]), val_rank1=_num(row["val_rank1"]),
                             val_mAP=_num(row["val_mAP"]), key=row["key"], generation=int(row["generation"]),
                             candidates_scored=len(rows), selection=mode, selection_done=bool(state.get("done")),
                             train_seconds=float(state.get("train_seconds", 0.0)),
                             scoring_seconds=sum(max(_num(r["seconds"]), 0.0) for r in rows),
                             bn_batches=state.get("settings", {}).get("bn_batches"))


def _rng_from_json(st: Sequence[Any]) -> tuple:
    v, internal, g = st
    return (v, tuple(internal), g)
