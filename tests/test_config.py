"""Recipe validation: every shipped recipe loads; malformed recipes fail naming the file and key."""
from pathlib import Path

import pytest

from nasreid.config import RecipeError, load_recipe

ALL = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
RECIPES = [p for p in ALL if not p.name.startswith("study_")]  # run recipes
STUDIES = [p for p in ALL if p.name.startswith("study_")]  # ``nasreid study`` recipes (nasreid.study schema)


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_shipped_study_recipes_validate(path):
    from nasreid.study import enumerate_jobs, load_study

    s = load_study(path)
    assert s.name and enumerate_jobs(s)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name and r.space.name
    assert (r.strategy is not None) or (r.model is not None) or "retrain" in path.name


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_can_start(path):
    """Not only the YAML schema: the dataset, target, loss and method kwargs fit their real signatures, and
    the space and strategy are built with the recipe's arguments (a recipe that cannot start fails here)."""
    import inspect

    from nasreid.engine.validate import check_recipe
    from nasreid.registry import DATASETS, SPACES, STRATEGIES

    r = load_recipe(path)
    check_recipe(r, search=r.strategy is not None)
    for ref in [r.data.dataset, *r.eval.targets]:  # bind the kwargs (the data itself may not be on disk)
        inspect.signature(DATASETS.get(ref.name)).bind(root=None, **ref.kwargs)
    space = SPACES.get(r.space.name)(num_classes=5, **r.space.kwargs)
    if r.strategy is not None:
        strategy = STRATEGIES.get(r.strategy.name)(space, **r.strategy.kwargs)
        if hasattr(strategy, "attach"):  # one-shot: the supernet
            strategy.attach()
        else:  # sampling (optuna): a sample of the space freezes into a network
            from nasreid.mutables import default_sample, freeze

            freeze(space, default_sample(space), copy_weights=False)


def test_paper_recipes_follow_the_paper():
    """The two recipes citing the paper carry its settings (see the comments in the files)."""
    search = load_recipe(RECIPES[0].parent / "osnet_ain.yaml")
    assert search.data.dataset.kwargs == {"combine_all": True}
    k = search.strategy.kwargs
    assert (k["lambda_decay"], k["lambda_start"], k["lambda_rate"], k["lambda_every"], k["lambda_min"]) == \
        ("multiplicative", 10.0, 0.5, 20, 1.0)
    retrain = load_recipe(RECIPES[0].parent / "osnet_ain_retrain.yaml")
    assert (retrain.optim.name, retrain.optim.lr, retrain.optim.scheduler, retrain.optim.epochs) == \
        ("amsgrad", 0.0015, "cosine", 100)
    assert retrain.training.freeze_backbone_epochs == 10 and retrain.training.open_layers == ["head.classifier"]


def test_space_and_dataset_kwargs_are_checked_against_signatures(tmp_path):
    from nasreid.engine.validate import check_recipe

    p = write(tmp_path, BASE.replace("space: {name: osnet_ain}", "space: {name: osnet_ain, kwargs: {width: 0.5}}"))
    with pytest.raises(RecipeError, match=r"r\.yaml: space\.kwargs\.width: unknown argument of search space "
                                          r"'osnet_ain'; accepted: .*width_mult"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE.replace("dataset: {name: cuhk01}", "dataset: {name: cuhk01, kwargs: {split: 1}}"))
    with pytest.raises(RecipeError, match=r"data\.dataset\.kwargs\.split: unknown argument of dataset 'cuhk01'"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE.replace("space: {name: osnet_ain}", "space: {name: osnet_ain, kwargs: {num_classes: 3}}"))
    with pytest.raises(RecipeError, match="space.kwargs.num_classes: set by nasreid"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE.replace("strategy: {name: gumbel}",
                                     "strategy: {name: gumbel, kwargs: {lambda_decay: exp}}"))
    with pytest.raises(RecipeError, match="strategy.kwargs.lambda_decay"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE + "loss: {name: focal}\n")
    with pytest.raises(RecipeError, match="loss.name: unknown loss 'focal'"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE + "eval: {matcher: {name: distance, kwargs: {metrc: euclidean}}}\n")
    with pytest.raises(RecipeError, match=r"eval\.matcher\.kwargs\.metrc: unknown argument of matcher 'distance'"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE + "eval: {postprocessors: [{name: no_such_postprocessor}]}\n")
    with pytest.raises(RecipeError,
                       match=r"eval\.postprocessors\[0\]\.name: unknown post-processor 'no_such_postprocessor'"):
        check_recipe(load_recipe(p))
    p = write(tmp_path, BASE + "model: {pretrained: no/such/weights.pth}\n")
    with pytest.raises(RecipeError, match="model.pretrained: weights file not found"):
        load_recipe(p)


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
name: t
data:
  dataset: {name: cuhk01}
  height: 128
  width: 64
space: {name: osnet_ain}
strategy: {name: gumbel}
"""


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, BASE + "optim: {lr: 0.1, learning_rate: 0.2}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "r.yaml" in str(e.value) and "optim.learning_rate" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_is_named(tmp_path):
    p = write(tmp_path, BASE + "optim: {epochs: many}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: optim\.epochs"):
        load_recipe(p)


def test_missing_required_key_is_named(tmp_path):
    p = write(tmp_path, "name: t\nspace: {name: osnet_ain}\n")
    with pytest.raises(RecipeError, match="missing required key 'data'"):
        load_recipe(p)


def test_input_size_and_pk_batch_are_checked(tmp_path):
    p = write(tmp_path, BASE.replace("height: 128", "height: 130"))
    with pytest.raises(RecipeError, match="data.height"):
        load_recipe(p)
    p = write(tmp_path, BASE.replace("width: 64", "width: 64\n  batch_size: 30\n  num_instances: 4"))
    with pytest.raises(RecipeError, match="multiple of num_instances"):
        load_recipe(p)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = write(tmp_path, BASE + "then_retrain: missing_retrain.yaml\n")
    with pytest.raises(RecipeError, match="missing_retrain.yaml"):
        load_recipe(p)
    p = write(tmp_path, BASE + "model: {genotype: no/such/genotype.json}\n")
    with pytest.raises(RecipeError, match="model.genotype"):
        load_recipe(p)


def test_yaml_syntax_error_names_file(tmp_path):
    p = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(RecipeError, match="YAML syntax error"):
        load_recipe(p)


def test_overrides_apply_before_validation(tmp_path):
    p = write(tmp_path, BASE)
    r = load_recipe(p, {"optim.epochs": 3, "strategy.kwargs.mode": "soft"})
    assert r.optim.epochs == 3 and r.strategy.kwargs == {"mode": "soft"}
