"""A user's own loss and strategy, registered from a file outside the package, run by ``nasreid search``
on real CUHK01 images; ``nasreid list`` shows them."""
import json
import sys
import textwrap

import pytest
import yaml

from nasreid import cli
from nasreid.registry import LOSSES, STRATEGIES

PLUGIN = textwrap.dedent('''
    """A user's plugin: a scaled cross-entropy loss and a strategy that trains one proxy network."""
    import json

    import torch
    from pydantic import BaseModel, ConfigDict

    from nasreid.mutables import freeze
    from nasreid.registry import LOSSES, STRATEGIES
    from nasreid.strategies import Strategy

    CALLS = {"loss": 0}


    @LOSSES.register("scaled_ce")
    class ScaledCE(torch.nn.Module):
        """Cross entropy times a factor (a user's loss)."""

        def __init__(self, num_classes, factor=1.0):
            super().__init__()
            self.factor = factor

        def forward(self, outputs, batch):
            CALLS["loss"] += 1
            loss = self.factor * torch.nn.functional.cross_entropy(outputs["logits"], batch["pid"])
            return loss, {"loss": float(loss.detach())}


    @STRATEGIES.register("last_choice")
    class LastChoice(Strategy):
        """Trains the sample of every choice's last value as a proxy network and returns it."""

        name = "last_choice"

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            proxy_epochs: int = 1

        def search(self, ctx):
            sample = {k: m.values[-1] for k, m in self.choices.items()}
            net = freeze(ctx.build_space(), sample, copy_weights=False)
            hist = ctx.train_fixed(net, epochs=self.cfg.proxy_epochs, run_dir=ctx.run_dir / "proxy")
            (ctx.run_dir / "last_choice.json").write_text(json.dumps({"sample": sample, "history": hist}))
            probs = {k: {str(v): float(v == sample[k]) for v in m.values} for k, m in self.choices.items()}
            return self._genotype(sample, probs, ctx, proxy_loss=hist[-1]["loss"])

        @classmethod
        def derive(cls, run_dir, recipe):
            from nasreid.strategies.base import make_genotype

            saved = json.loads((run_dir / "last_choice.json").read_text())
            return make_genotype(recipe, saved["sample"], {})
''')


@pytest.fixture
def plugin_file(tmp_path):
    p = tmp_path / "user_plugin.py"
    p.write_text(PLUGIN)
    yield p
    LOSSES.unregister("scaled_ce")
    STRATEGIES.unregister("last_choice")
    for name in [m for m, mod in sys.modules.items() if getattr(mod, "__file__", None) == str(p.resolve())]:
        del sys.modules[name]


def test_user_registered_loss_and_strategy_run(tmp_path, plugin_file, shared_data, capsys):
    recipe = {
        "name": "plugin_search", "seed": 0, "device": "cpu", "output_root": str(tmp_path / "results"),
        "plugins": [plugin_file.name],  # relative to the recipe's folder
        "data": {"dataset": {"name": "cuhk01", "root": str(shared_data / "cuhk01"),
                             "kwargs": {"split_seed": 0, "max_ids": 16}},
                 "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0},
        "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 32}},
        "strategy": {"name": "last_choice", "kwargs": {"proxy_epochs": 2}},
        "loss": {"name": "scaled_ce", "kwargs": {"factor": 3.0}},
        "optim": {"lr": 0.01, "epochs": 2},
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["search", str(path), "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    geno = json.loads((run / "genotype.json").read_text())
    assert set(geno["choices"].values()) == {"os_in_in_out"}  # the strategy's pick, not a default
    saved = json.loads((run / "last_choice.json").read_text())
    assert len(saved["history"]) == 2 and (run / "proxy" / "checkpoints" / "last.pt").is_file()
    mod = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(plugin_file.resolve()))
    assert mod.CALLS["loss"] == 2 * saved["history"][0]["steps"]  # the user's loss computed every step
    # 3 x cross entropy of 8 training ids at initialisation: about 3 ln 8 = 6.2
    assert 4.0 < saved["history"][0]["loss"] < 8.0
    # derive asks the user's strategy
    assert cli.main(["derive", str(run), "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "genotype.json").read_text())["choices"] == geno["choices"]
    capsys.readouterr()
    assert cli.main(["list", "losses", "--plugin", str(plugin_file)]) == 0
    out = capsys.readouterr().out
    assert "scaled_ce" in out and "Cross entropy times a factor" in out and "reid" in out
    assert cli.main(["list", "strategies", "last*"]) == 0
    assert capsys.readouterr().out.split() == ["strategies:", "last_choice", "Trains", "the", "sample", "of",
                                               "every", "choice's", "last", "value", "as", "a", "proxy",
                                               "network", "and", "returns", "it."]


def test_registry_refuses_duplicates_and_names_unknown_entries():
    from nasreid.errors import NasreidError

    with pytest.raises(NasreidError, match="already registered"):
        LOSSES.register("reid", lambda num_classes: None)
    with pytest.raises(NasreidError, match="unknown loss 'nope'; known: .*reid"):
        LOSSES.get("nope")
    assert "osnet_ain" in cli_list_names("spaces")


def cli_list_names(kind):
    from nasreid.registry import ALL_REGISTRIES

    return ALL_REGISTRIES[kind].names()


AUG_PLUGIN = textwrap.dedent('''
    """A user's augmentation: paint the top rows grey (registered by name, used under data.augment)."""
    import torch
    from pydantic import BaseModel, ConfigDict, Field
    from torchvision.transforms import v2

    from nasreid.registry import AUGMENTATIONS


    @AUGMENTATIONS.register("grey_top")
    class GreyTop(v2.Transform):
        """Rows ``[0, rows)`` set to 128 on the uint8 image."""

        stage = "pixel"

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            rows: int = Field(4, ge=1)

        def __init__(self, rows: int = 4):
            super().__init__()
            self.rows = rows

        def transform(self, inpt, params):
            out = inpt.clone()
            out[..., : self.rows, :] = 128
            return out
''')


def test_a_users_augmentation_is_named_under_data_augment(tmp_path, cuhk01_dir):
    """RSA and Random Block are registry entries, not schema fields: a plugin's augmentation is configured the
    same way, validated by its Config, and runs at its stage on real images."""
    import torch

    from nasreid.config import RecipeError, load_recipe
    from nasreid.data import build_dataset
    from nasreid.data.transforms import build_transforms
    from nasreid.registry import AUGMENTATIONS

    (tmp_path / "grey_top.py").write_text(AUG_PLUGIN)
    base = {"name": "aug", "plugins": ["grey_top.py"], "space": {"name": "osnet_ain"},
            "data": {"dataset": {"name": "cuhk01", "root": str(cuhk01_dir.parent)}, "height": 64, "width": 32,
                     "augment": {"flip": False, "grey_top": {"rows": 8}, "rsa": None}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(base))
    try:  # load_recipe imports the recipe's plugins before it validates data.augment
        recipe = load_recipe(tmp_path / "r.yaml")
        aug = recipe.data.augment.model_dump()
        assert aug["grey_top"] == {"rows": 8} and aug["rsa"] is None
        tf = build_transforms(64, 32, is_train=True, **{k: v for k, v in aug.items()})
        assert [type(op).__name__ for op in tf.transforms].index("GreyTop") < \
            [type(op).__name__ for op in tf.transforms].index("ToDtype")  # before normalisation
        ds = build_dataset("cuhk01", cuhk01_dir.parent, split_seed=0, max_ids=4)
        x = tf(ds.read_image(ds.train[0]))
        grey = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        torch.testing.assert_close(x[:, :8, :], grey.view(3, 1, 1).expand(3, 8, 32), atol=1e-5, rtol=0)
        assert not torch.allclose(x[:, 8:, :], grey.view(3, 1, 1).expand(3, 56, 32))
        for bad, msg in (({"grey_top": {"rows": 0}}, r"data.augment.grey_top.rows"),
                         ({"grey_tops": {}}, r"unknown augmentation 'grey_tops'; known: grey_top, random_block, rsa"),
                         ({"rsa": {"p": 2}}, r"data.augment.rsa.p")):
            (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "data": {**base["data"], "augment": bad}}))
            with pytest.raises(RecipeError, match=msg):
                load_recipe(tmp_path / "bad.yaml")
    finally:
        AUGMENTATIONS.unregister("grey_top")
