"""nasreid.profile: parameter / multiply-add counts and measured latency of fixed networks (tiny inputs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from nasreid.errors import NasreidError, RunFolderError
from nasreid.genotype import GenotypeError, preset_genotype
from nasreid.models.complexity import count_multiply_adds, count_parameters
from nasreid.profile import ProfileError, format_profile, profile_network

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(input_size=(64, 32), batch_sizes=(1, 4), devices=["cpu"], warmup=1, iters=2)
KW = {"width_mult": 0.25}


@pytest.fixture(scope="module")
def geno():
    return preset_genotype("osnet_ain", "osnet_ain", **KW)


def test_counts_equal_complexity_functions_and_latency_is_positive(geno):
    rep = profile_network(geno, num_classes=10, **SMALL)
    net = geno.build(num_classes=10)
    assert rep["params"] == count_parameters(net)
    assert rep["params_no_classifier"] == count_parameters(net, exclude=("head.classifier.",))
    assert rep["params"] - rep["params_no_classifier"] == sum(p.numel() for p in net.head.classifier.parameters()) > 0
    assert rep["macs"] > 0 and rep["macs"] == count_multiply_adds(net, (64, 32))
    assert rep["input_size"] == [64, 32] and rep["model"]["space"] == "osnet_ain"
    lat = rep["latency"]
    assert [(e["device"], e["batch_size"]) for e in lat] == [("cpu", 1), ("cpu", 4)]
    for e in lat:
        assert e["iters"] == 2 and e["warmup"] == 1 and not e["amp"] and not e["channels_last"]
        assert 0 < e["min_ms"] <= e["median_ms"] <= e["p90_ms"]
        assert e["images_per_s"] == pytest.approx(e["batch_size"] * 1000 / e["median_ms"])
        assert e["device_name"] == rep["environment"]["cpu"] and e["peak_memory_mib"] is None
    env = rep["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == 1 and env["devices"]["cpu"]
    json.dumps(rep)  # JSON-ready (the CLI's --json)


def test_format_profile_shows_the_numbers(geno):
    rep = profile_network(geno, **SMALL)
    text = format_profile(rep)
    assert f"{rep['params']:,}" in text and f"{rep['macs']:,}" in text and "64x32" in text
    for e in rep["latency"]:
        assert f"{e['median_ms']:.2f}" in text and f"{e['p90_ms']:.2f}" in text and f"{e['images_per_s']:.1f}" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("cpu ")]) == 2


def test_preset_genotype_file_run_folder_and_module_are_accepted(geno, tmp_path):
    by_preset = profile_network("preset:osnet_ain", space="osnet_ain", **SMALL)
    full = preset_genotype("osnet_ain", "osnet_ain")
    assert by_preset["params"] == count_parameters(full.build()) and by_preset["model"]["source"] == "preset:osnet_ain"

    path = geno.save(tmp_path / "genotype.json")
    by_file = profile_network(path, **SMALL)
    by_str = profile_network(str(path), **{**SMALL, "batch_sizes": (1,)})
    assert by_file["params"] == by_str["params"] == count_parameters(geno.build())
    assert by_file["macs"] == count_multiply_adds(geno.build(), (64, 32))

    run = tmp_path / "run"  # a run folder: its genotype, and its recipe's input size as the default
    run.mkdir()
    geno.save(run / "genotype.json")
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "osnet_ain_cpu_retrain.yaml").read_text())
    recipe["data"].update(height=96, width=48)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    by_run = profile_network(run, batch_sizes=(1,), warmup=0, iters=1, devices="cpu")
    assert by_run["input_size"] == [96, 48] and by_run["params"] == by_file["params"]
    assert by_run["macs"] == count_multiply_adds(geno.build(), (96, 48))
    assert profile_network(run, input_size=(64, None), batch_sizes=(1,), iters=1)["input_size"] == [64, 48]

    net = geno.build(num_classes=3).train()
    by_module = profile_network(net, **{**SMALL, "batch_sizes": (2,)})
    assert by_module["params"] == count_parameters(net) and net.training  # mode restored


def test_bad_arguments_raise_clear_errors(geno, tmp_path):
    with pytest.raises(ProfileError, match="space"):
        profile_network("preset:osnet")
    with pytest.raises(GenotypeError, match="no preset 'nope'"):
        profile_network("preset:nope", space="osnet_ain")
    with pytest.raises(ProfileError, match="space='msinet'"):
        profile_network(geno, space="msinet")
    with pytest.raises(ProfileError, match="neither"):
        profile_network(str(tmp_path / "missing.json"))
    with pytest.raises(RunFolderError, match="genotype.json"):
        profile_network(tmp_path)
    with pytest.raises(ProfileError, match="batch_sizes"):
        profile_network(geno, batch_sizes=(0,))
    with pytest.raises(ProfileError, match="iters"):
        profile_network(geno, iters=0)
    with pytest.raises(ProfileError, match="input_size"):
        profile_network(geno, input_size=(64,))
    with pytest.raises(ProfileError, match="devices"):
        profile_network(geno, devices=["tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ProfileError, match="CUDA is not available"):
            profile_network(geno, devices=["cuda"])
    assert issubclass(ProfileError, NasreidError) and issubclass(ProfileError, ValueError)
