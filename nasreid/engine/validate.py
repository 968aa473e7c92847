"""Check a recipe against the real signatures of what it names, before anything is trained.

The YAML schema (:mod:`nasreid.config`) checks the recipe's own keys; the ``kwargs`` dicts it passes on
(space, dataset, evaluation targets, strategy, loss, training method) are checked here against the
constructor they go to, so a typo is a one-line error naming the recipe file and the key instead of a
``TypeError`` traceback after the data was loaded -- or after the search finished, for ``then_retrain`` and
``eval.targets``.
"""
from __future__ import annotations

from pathlib import Path

from nasreid.config import Recipe, RecipeError, load_recipe
from nasreid.errors import NasreidError
from nasreid.registry import (
    DATASETS,
    LOSSES,
    MATCHERS,
    METHODS,
    POSTPROCESSORS,
    SPACES,
    STRATEGIES,
    check_kwargs,
    load_plugins,
)

__all__ = ["check_kwargs", "check_recipe"]


def _refuse_unhonoured(component, recipe: Recipe, src: str, what: str) -> None:
    """Refuse the common recipe keys that ``recipe`` sets (to a value other than the schema's default) and that
    ``component`` -- a training method or a strategy, ``what`` names it -- does not honour
    (:func:`~nasreid.methods.base.unhonoured_keys`).

    Raises:
        RecipeError: one line naming the recipe file, the first such key and ``what`` (the others after it).
    """
    from nasreid.methods.base import unhonoured_keys

    refused = unhonoured_keys(component, recipe)
    if refused:
        raise RecipeError(f"{src}: {refused[0]}: {what} does not honour this key (it would be ignored); remove it"
                          + (f" (also: {', '.join(refused[1:])})" if refused[1:] else ""))


def _non_default(section, keys) -> list[str]:
    """The ``keys`` of a recipe section (a pydantic model) whose value differs from the schema's default: what
    the recipe *sets*. A key's presence means nothing, since a run folder's ``recipe.yaml`` writes every key
    with its default and ``--resume`` reads it back."""
    fields = type(section).model_fields
    return [k for k in keys if getattr(section, k) != fields[k].get_default(call_default_factory=True)]


def _lookup(registry, name: str, where: str):
    try:
        return registry.get(name)
    except NasreidError as e:
        raise RecipeError(f"{where}: {e}") from None


def check_recipe(recipe: Recipe, *, search: bool = False, _seen: frozenset = frozenset()) -> None:
    """Validate everything ``recipe`` names before a run starts: plugins imported; space, strategy, loss,
    training method, dataset and every ``eval.targets`` entry known, with kwargs that fit their
    constructors (:meth:`~nasreid.registry.Registry.validate`: a component's pydantic ``Config`` when it declares one,
    else its signature); no common recipe key that the training method -- and, when ``search``, the strategy
    (``Strategy.honours``) -- does not honour (:func:`~nasreid.methods.base.unhonoured_keys`); the evaluation
    matcher and post-processors known with fitting kwargs; the genotype preset known; ``then_retrain`` (when
    ``search``) loaded and checked too.

    A key is refused for a value its component does not honour, never for the schema's default: the recipe a run
    folder holds (``recipe.yaml``, every key written with its default) passes as the recipe it was written from
    did, so ``--resume`` works.

    Raises:
        RecipeError: the first problem, naming the recipe file and the key.
    """
    src = recipe.source or "<recipe>"
    if recipe.plugins:
        load_plugins(recipe.plugins, Path(src).parent if recipe.source else None)
    if recipe.distributed.sync_bn and not recipe.device.startswith("cuda"):
        raise RecipeError(f"{src}: distributed.sync_bn: SyncBatchNorm needs device cuda (PyTorch has no CPU "
                          f"implementation), the recipe's device is {recipe.device!r}")
    if recipe.distributed.backend == "nccl" and not recipe.device.startswith("cuda"):
        raise RecipeError(f"{src}: distributed.backend: nccl needs device cuda; use gloo on {recipe.device!r}")
    # one validation path for every registered component (Registry.validate: its Config, else its signature)
    _lookup(SPACES, recipe.space.name, f"{src}: space.name")
    SPACES.validate(recipe.space.name, recipe.space.kwargs, f"{src}: space.kwargs", reserved=("num_classes",))
    _lookup(DATASETS, recipe.data.dataset.name, f"{src}: data.dataset.name")
    DATASETS.validate(recipe.data.dataset.name, recipe.data.dataset.kwargs, f"{src}: data.dataset.kwargs",
                      reserved=("root",))
    if recipe.eval.every_split == "val" and recipe.data.val_ids is None:
        raise RecipeError(f"{src}: eval.every_split: 'val' evaluates the training identities held out by "
                          "data.val_ids, which the recipe does not set")
    for i, t in enumerate(recipe.eval.targets):
        _lookup(DATASETS, t.name, f"{src}: eval.targets[{i}].name")
        DATASETS.validate(t.name, t.kwargs, f"{src}: eval.targets[{i}].kwargs", reserved=("root", "eval_only"))
    if recipe.eval.matcher is not None:
        m = recipe.eval.matcher
        _lookup(MATCHERS, m.name, f"{src}: eval.matcher.name")
        MATCHERS.validate(m.name, m.kwargs, f"{src}: eval.matcher.kwargs")
    for i, pp in enumerate(recipe.eval.postprocessors):
        _lookup(POSTPROCESSORS, pp.name, f"{src}: eval.postprocessors[{i}].name")
        POSTPROCESSORS.validate(pp.name, pp.kwargs, f"{src}: eval.postprocessors[{i}].kwargs")
    _lookup(LOSSES, recipe.loss.name, f"{src}: loss.name")
    LOSSES.validate(recipe.loss.name, recipe.loss.kwargs, f"{src}: loss.kwargs", reserved=("num_classes",))
    method = _lookup(METHODS, recipe.training.method, f"{src}: training.method")
    METHODS.validate(recipe.training.method, recipe.training.kwargs, f"{src}: training.kwargs")
    _refuse_unhonoured(method, recipe, src, f"training method {recipe.training.method!r}")
    if recipe.strategy is not None:
        strategy = _lookup(STRATEGIES, recipe.strategy.name, f"{src}: strategy.name")
        STRATEGIES.validate(recipe.strategy.name, recipe.strategy.kwargs, f"{src}: strategy.kwargs")
        if search:  # what the strategy's own loop honours (Strategy.honours), as for a training method
            _refuse_unhonoured(strategy, recipe, src, f"strategy {recipe.strategy.name!r}")
        own = [k for k in getattr(strategy, "validation_kwargs", ()) if k in recipe.strategy.kwargs]
        if recipe.data.val_ids is not None and own:
            raise RecipeError(f"{src}: strategy.kwargs.{own[0]}: strategy {recipe.strategy.name!r} validates on the "
                              "identities that data.val_ids holds out when the recipe sets it; remove this key")
    elif search:
        raise RecipeError(f"{src}: a search recipe needs a 'strategy' section")
    if search and recipe.model:
        # a search warm-starts its supernet from model.pretrained (RunContext.build_space); the rest of the
        # section chooses or loads a fixed network, which a search does not train. Refused for a value set, never
        # for the default that a run folder's recipe.yaml writes back (genotype: null, preset: null ...)
        wrong = _non_default(recipe.model, ("genotype", "preset", "warm_start"))
        if wrong:
            raise RecipeError(f"{src}: model.{wrong[0]}: a search recipe does not honour this key (a search trains "
                              "the space's supernet; model.pretrained warm-starts it, always as a warm start); "
                              "set it in the then_retrain recipe")
    if recipe.model and recipe.model.preset:
        from nasreid.genotype import preset_genotype

        try:
            preset_genotype(recipe.space.name, recipe.model.preset)
        except NasreidError as e:
            raise RecipeError(f"{src}: model.preset: {e}") from None
    if search and recipe.then_retrain:
        if recipe.then_retrain in _seen:
            raise RecipeError(f"{src}: then_retrain loops back to {recipe.then_retrain}")
        retrain = load_recipe(recipe.then_retrain)
        if retrain.space.name != recipe.space.name:
            raise RecipeError(f"{recipe.then_retrain}: space.name {retrain.space.name!r} differs from the search's "
                              f"{recipe.space.name!r} ({src}: then_retrain)")
        check_recipe(retrain, _seen=_seen | {recipe.then_retrain})
