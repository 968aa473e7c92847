"""A retrain run folder as ``nasreid train`` leaves it (``recipe.yaml``, ``genotype.json``, ``model.pt``), built
without training, for tests of what reads run folders (export, feature extractor, ranked-list pictures)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def make_untrained_run(root: Path, data: Path, recipe_file: str = "osnet_ain_cpu_retrain.yaml", name: str = "run",
                       space_kwargs: dict | None = None, preset: str = "osnet_ain", cuhk01: dict | None = None,
                       perturb_bn: bool = True) -> Path:
    """``root/name``: the run folder of ``recipes/recipe_file`` on real CUHK01 (``data/cuhk01``, parser options
    ``cuhk01``, default ``split_seed 0, max_ids 40``), network ``preset`` with random weights. With ``perturb_bn``
    the BN affine parameters are drawn away from 1/0 and the running statistics come from two train-mode passes
    over real images, so eval-mode BN is exercised. Equality tests only: no accuracy claim."""
    from nasreid.config import load_recipe
    from nasreid.data import build_dataset, build_transforms
    from nasreid.engine.checkpoint import save_checkpoint
    from nasreid.genotype import preset_genotype

    cuhk01 = cuhk01 or {"split_seed": 0, "max_ids": 40}
    raw = yaml.safe_load((RECIPES / recipe_file).read_text())
    raw.update(name=name, output_root=str(root))
    raw["data"].update(dataset={"name": "cuhk01", "root": str(data / "cuhk01"), "kwargs": cuhk01}, workers=0)
    raw["space"]["kwargs"].update(space_kwargs or {})
    raw["eval"]["targets"] = []
    raw["model"] = {"preset": preset}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(root / f"{name}.yaml")
    run = root / name
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.model_copy(update={"source": None}).to_yaml())
    geno = preset_genotype(recipe.space.name, preset, **recipe.space.kwargs)
    geno.save(run / "genotype.json")
    ds = build_dataset("cuhk01", str(data / "cuhk01"), **cuhk01)
    torch.manual_seed(0)
    net = geno.build(num_classes=ds.num_train_pids)
    if perturb_bn:
        tf = build_transforms(recipe.data.height, recipe.data.width, is_train=False)
        x = torch.stack([tf(ds.read_image(r)) for r in ds.train[:16]])
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
            net.train()
            for i in range(2):
                net(x[8 * i:8 * i + 8])
    save_checkpoint(run / "model.pt", {"model": net.state_dict(), "genotype": geno.to_dict(),
                                       "num_classes": ds.num_train_pids})
    return run
