"""Recipe validation: every shipped recipe loads; malformed recipes fail naming the file and key."""
from pathlib import Path

import pytest

from nasreid.config import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name and r.space.name
    assert (r.strategy is not None) or (r.model is not None) or "retrain" in path.name


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
