"""The training-method base: every method honours the common recipe keys it declares (``optim.lr_mult``,
``training.freeze_backbone_epochs``) or the recipe check refuses them by name; ``training.kwargs`` go through the
method's pydantic ``Config``; a user's method is one small file."""
from __future__ import annotations

import textwrap

import pytest
import torch

from nasreid.config import Recipe, RecipeError
from nasreid.data.datasets.synthetic import SyntheticReID
from nasreid.engine.context import RunContext
from nasreid.engine.hooks import CallbackHook
from nasreid.engine.trainer import device_context
from nasreid.engine.validate import check_recipe
from nasreid.genotype import preset_genotype
from nasreid.methods import COMMON_KEYS, TrainingMethod, unhonoured_keys
from nasreid.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD_KWARGS = {
    "supervised": {},
    "qaconv": {"stage": "conv3", "dim": 16},
    "domainmix": {"unlabelled": None, "steps_per_epoch": 2},  # A only: the same code path without B
}


def _recipe(method: str, **sections) -> Recipe:
    d = {"name": f"tiny_{method}", "seed": 0, "device": "cpu",
         "data": {"dataset": {"name": "synthetic"}, "height": 64, "width": 32, "batch_size": 8,
                  "num_instances": 4, "workers": 0},
         "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 32, "head": "bnneck"}},
         "model": {"preset": "osnet"},
         "training": {"method": method, "kwargs": METHOD_KWARGS[method]},
         "optim": {"name": "sgd", "lr": 0.05, "epochs": 2, "scheduler": "constant"}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return Recipe.model_validate(d)


def _fit(method: str, tmp_path, **sections):
    """Train the tiny network 2 epochs with ``method``; return the probe's record of what moved and the lrs."""
    recipe = _recipe(method, **sections)
    ds = SyntheticReID(num_ids=8, images_per_id_per_cam=1, num_cams=4, height=64, width=32, seed=0)
    ctx = RunContext(recipe=recipe, run_dir=tmp_path, device=device_context("cpu"), dataset=ds)
    torch.manual_seed(0)
    net = preset_genotype("osnet_ain", "osnet", **recipe.space.kwargs).build(num_classes=ds.num_train_pids)
    seen: dict = {"moved": []}

    def snapshot(tr):
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    def before_train(tr):
        seen["lrs"] = {g.get("name"): g["lr"] for g in tr.optimizer.param_groups}
        seen["start"] = snapshot(tr)

    def after_epoch(tr):
        now = snapshot(tr)
        seen["moved"].append({n for n, v in now.items() if n in seen["start"] and not torch.equal(v, seen["start"][n])})
        seen["start"] = now

    hist = METHODS.get(method)(**recipe.training.kwargs).fit(
        ctx, net, epochs=2, hooks=[CallbackHook("probe", before_train=before_train, after_epoch=after_epoch)])
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    return seen


@pytest.mark.parametrize("method", ["supervised", "qaconv", "domainmix"])
def test_every_method_honours_lr_mult(method, tmp_path):
    pattern = "qaconv.*" if method == "qaconv" else "*classifier*"
    seen = _fit(method, tmp_path, optim={"lr_mult": {pattern: 10.0}})
    assert seen["lrs"]["base"] == pytest.approx(0.05) and seen["lrs"][pattern] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["supervised", "qaconv", "domainmix"])
def test_every_method_honours_freeze_backbone_epochs(method, tmp_path):
    seen = _fit(method, tmp_path, training={"freeze_backbone_epochs": 1})
    first, second = seen["moved"]
    opened = ("head.", "qaconv.") if method == "qaconv" else ("head.",)
    assert first and all(n.startswith(opened) for n in first), sorted(first)[:5]  # epoch 1: only the head
    assert any(n.startswith("conv1.") for n in second)  # epoch 2: the backbone trains too
    if method == "qaconv":
        assert any(n.startswith("qaconv.") for n in first)  # the method's own head is open


@pytest.mark.parametrize("method, key, value", [
    ("qaconv", "loss", {"triplet_weight": 1.0}),
    ("qaconv", "loss", {"name": "msinet"}),
    ("domainmix", "loss", {"name": "msinet"}),
    ("domainmix", "loss", {"triplet_weight": 0.5}),
])
def test_the_recipe_check_refuses_a_key_the_method_does_not_honour(method, key, value):
    recipe = _recipe(method, **{key: value})
    key = next(iter(value))
    bad = "loss.name" if key == "name" else f"loss.kwargs.{key}"
    assert unhonoured_keys(METHODS.get(method), recipe) == [bad]
    with pytest.raises(RecipeError, match=rf"{bad}: training method '{method}' does not honour"):
        check_recipe(recipe)


def test_the_keys_each_method_honours():
    assert METHODS.get("supervised").honours == frozenset(COMMON_KEYS)
    assert not any(k.startswith("loss.") for k in METHODS.get("qaconv").honours)
    assert {"loss.kwargs.label_smooth", "loss.kwargs.triplet_margin"} <= METHODS.get("domainmix").honours
    assert not {"loss.kwargs.triplet_weight", "loss.kwargs", "loss.name"} & METHODS.get("domainmix").honours
    for name in ("qaconv", "domainmix"):
        assert {"optim.lr_mult", "training.freeze_backbone_epochs", "model.pretrained"} <= METHODS.get(name).honours
    check_recipe(_recipe("domainmix", loss={"label_smooth": 0.2, "triplet_margin": 0.5}))  # honoured: accepted
    check_recipe(_recipe("supervised", loss={"triplet_weight": 1.0}))


def test_training_kwargs_are_validated_by_the_method_config():
    with pytest.raises(RecipeError, match=r"training.kwargs.nosuch: unknown argument of training method 'qaconv'; "
                                          r"accepted: stage, dim, kernel, gamma"):
        check_recipe(_recipe("qaconv", training={"kwargs": {"nosuch": 1}}))
    with pytest.raises(RecipeError, match=r"training.kwargs.gamma"):
        check_recipe(_recipe("qaconv", training={"kwargs": {"gamma": -1}}))
    with pytest.raises(RecipeError, match=r"training.kwargs.cluster.eps"):
        check_recipe(_recipe("domainmix", training={"kwargs": {"cluster": {"eps": 2.0}}}))
    with pytest.raises(RecipeError, match=r"training.kwargs.anything: unknown argument"):
        check_recipe(_recipe("supervised", training={"kwargs": {"anything": 1}}))


PLUGIN = '''
    """A user's training method: ID loss only, no triplet (one file, registered by name)."""
    import torch.nn.functional as F
    from pydantic import Field

    from nasreid.methods import TrainingMethod
    from nasreid.registry import METHODS


    @METHODS.register("id_only")
    class IDOnlyMethod(TrainingMethod):
        """Cross-entropy on the identity logits with label smoothing ``eps``."""

        class Config(TrainingMethod.Config):
            eps: float = Field(0.1, ge=0, lt=1)

        honours = TrainingMethod.honours - {"loss.name", "loss.kwargs", "loss.kwargs.triplet_weight"}

        def build_loss(self, num_classes):
            return None

        def step(self, trainer, batch):
            trainer.optimizer.zero_grad(set_to_none=True)
            with trainer.ctx.autocast():
                out = trainer.forward_model(batch["img"])
            loss = F.cross_entropy(out["logits"].float(), batch["pid"], label_smoothing=self.cfg.eps)
            parts = {"loss": float(loss.detach())}
            self.update(trainer, loss, parts)
            return parts
'''


def test_a_users_method_is_one_small_file(tmp_path):
    import yaml

    from nasreid.engine import pipeline

    source = textwrap.dedent(PLUGIN)
    assert len(source.strip().splitlines()) < 40
    (tmp_path / "id_only.py").write_text(source)
    d = _recipe("supervised").model_dump(mode="json")
    d.update(plugins=["id_only.py"], output_root=str(tmp_path / "results"), source=None)
    d["training"] = {"method": "id_only", "kwargs": {"eps": 0.2}}
    d["optim"]["epochs"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    from nasreid.config import load_recipe

    recipe = load_recipe(tmp_path / "r.yaml")
    check_recipe(recipe)
    assert issubclass(METHODS.get("id_only"), TrainingMethod)
    with pytest.raises(RecipeError, match="training.kwargs.eps"):
        check_recipe(recipe.model_copy(update={"training": recipe.training.model_copy(update={"kwargs": {"eps": 1}})}))
    with pytest.raises(RecipeError, match="loss.kwargs.triplet_weight: training method 'id_only' does not honour"):
        loss = recipe.loss.model_copy(update={"kwargs": {"triplet_weight": 1}})
        check_recipe(recipe.model_copy(update={"loss": loss}))
    run = pipeline.run_train(recipe, run_dir=tmp_path / "run", progress=False)
    import json

    m = json.loads((run / "metrics.json").read_text())
    assert len(m["history"]) == 1 and "synthetic (same-domain)" in m["evaluation"]
    METHODS.unregister("id_only")


def test_reid_loss_keys_moved_under_kwargs_and_old_recipes_still_load(tmp_path, caplog):
    """``loss: {label_smooth, triplet_weight, triplet_margin}`` (recipes and run folders written before the move)
    load into ``loss.kwargs`` with one notice; both places set differently, or the old keys on another loss, are
    errors naming the key; the committed run folders' recipes load."""
    import logging

    import nasreid.config as C
    from nasreid.config import load_recipe

    base = _recipe("supervised").model_dump(mode="json")
    import yaml

    old = {**base, "source": None, "loss": {"name": "reid", "kwargs": {}, "label_smooth": 0.2, "triplet_weight": 1.0,
                                            "triplet_margin": 0.3}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    C._NOTICED.clear()
    with caplog.at_level(logging.WARNING, logger="nasreid"):
        r = load_recipe(tmp_path / "old.yaml")
        load_recipe(tmp_path / "old.yaml")
    assert r.loss.kwargs == {"label_smooth": 0.2, "triplet_weight": 1.0, "triplet_margin": 0.3}
    notices = [m for m in caplog.messages if "moved to loss.kwargs" in m]
    assert len(notices) == 1 and "loss.label_smooth, loss.triplet_weight, loss.triplet_margin" in notices[0]
    assert "label_smooth" not in yaml.safe_load(r.to_yaml())["loss"]  # written back in the new layout
    both = {**old, "loss": {"kwargs": {"triplet_weight": 0.5}, "triplet_weight": 1.0}}
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(RecipeError, match=r"loss.triplet_weight \(1.0\) and loss.kwargs.triplet_weight \(0.5\)"):
        load_recipe(tmp_path / "both.yaml")
    from pathlib import Path

    runs = sorted(Path(__file__).resolve().parents[1].glob("results/**/recipe.yaml"))
    assert len(runs) > 100
    for path in runs:  # every committed run folder's recipe still loads, the old keys read into loss.kwargs
        raw_loss = yaml.safe_load(path.read_text()).get("loss") or {}
        rec = load_recipe(path)
        assert set(rec.loss.model_dump()) == {"name", "kwargs"}, path
        if rec.loss.name == "reid" and "triplet_margin" in raw_loss:
            assert rec.loss.kwargs["triplet_margin"] == raw_loss["triplet_margin"], path
