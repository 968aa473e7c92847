"""The CPU fast path (issue 26): instance norm computed as a one-group-per-channel group norm, channels_last decided
per network, training images decoded once, no loader worker processes on the CPU by default -- each equal to what it
replaces, and a run on these defaults still resumes bit for bit (a real SIGKILL of ``nasreid train``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nasreid.config import load_recipe, loader_workers
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.engine.trainer import device_context
from nasreid.genotype import preset_genotype
from nasreid.models.osnet import InstanceNorm2d

ROOT = Path(__file__).resolve().parents[1]

FIXED = {
    "name": "fast_path",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 24}},
             "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "augment": {"flip": True}},
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "model": {"preset": "osnet"},
    "optim": {"lr": 0.05, "epochs": 3, "scheduler": "cosine"},
    "eval": {"flip": False, "batch_size": 64},
}


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(4, 16, 32, 16), (2, 24, 8, 4)])
def test_instance_norm_as_group_norm_equals_instance_norm(shape, affine):
    """Forward and backward of the CPU path equal ``F.instance_norm`` (to float rounding), state dict unchanged."""
    torch.manual_seed(0)
    m = InstanceNorm2d(shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    ref = torch.nn.InstanceNorm2d(shape[1], affine=affine)
    ref.load_state_dict(m.state_dict())
    assert list(m.state_dict()) == list(ref.state_dict())
    x = (torch.randn(shape) * 3 + 1).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(shape)
    y, y2 = m(x), ref(x2)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    # a channels_last input stays channels_last (group norm's channels_last kernel) with the same values and gradients
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    yc = m(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, y2.detach(), rtol=1e-5, atol=1e-5)
    (yc * g).sum().backward()
    torch.testing.assert_close(xc.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_channels_last_is_on_for_cpu_networks_by_default():
    """``channels_last: null`` (the default): on for a CPU network, with or without IN layers (their group norm keeps
    the format); an explicit ``false`` wins."""
    plain = preset_genotype("osnet_ain", "osnet", width_mult=0.125).build(num_classes=5)
    with_in = preset_genotype("osnet_ain", "osnet_ain", width_mult=0.125).build(num_classes=5)
    ctx = device_context("cpu", channels_last=None)
    ctx.model(plain)
    assert ctx.channels_last is True
    assert plain.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert ctx.images(torch.randn(2, 3, 64, 32)).is_contiguous(memory_format=torch.channels_last)
    ctx = device_context("cpu", channels_last=None)
    ctx.model(with_in)
    assert ctx.channels_last is True
    x = ctx.images(torch.randn(2, 3, 64, 32))
    with_in.eval()
    assert torch.allclose(with_in(x), with_in.to(memory_format=torch.contiguous_format)(x.contiguous()), atol=1e-5)
    ctx = device_context("cpu", channels_last=False)  # an explicit recipe value wins
    ctx.model(preset_genotype("osnet_ain", "osnet", width_mult=0.125).build(num_classes=5))
    assert ctx.channels_last is False


def test_loader_workers_default_by_device(write_recipe):
    r = load_recipe(write_recipe(FIXED))
    assert r.data.workers is None and loader_workers(r) == 0
    assert loader_workers(r.model_copy(update={"device": "cuda"})) == min(4, os.cpu_count() or 1)
    assert loader_workers(load_recipe(write_recipe(FIXED, **{"data.workers": 2}))) == 2


def test_decoded_images_are_read_once_across_epochs(cuhk01_dir, shared_data):
    """With ``cache_images`` the loader reads each training image from disk once, whatever the number of epochs;
    the batches are those of the uncached loader."""
    from nasreid.data import build_dataset, build_train_loader

    ds = build_dataset("cuhk01", str(shared_data / "cuhk01"), split_seed=0, max_ids=12)
    reads = {"n": 0}
    original = ds.read_image

    def counting(rec):
        reads["n"] += 1
        return original(rec)

    ds.read_image = counting
    kw = dict(height=64, width=32, batch_size=16, num_instances=4, workers=0, seed=0, flip=True)
    cached, plain = build_train_loader(ds, cache_images=True, **kw), build_train_loader(ds, **kw)
    for epoch in range(2):
        for loader in (cached, plain):
            loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch)
        a = [b["img"] for b in cached]
        torch.manual_seed(epoch)
        n_before = reads["n"]
        b = [b["img"] for b in plain]
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) > 0
        assert reads["n"] - n_before == sum(len(x) for x in b)  # the plain loader reads every image every epoch
    assert cached.dataset._cached_bytes > 0
    assert reads["n"] == len(cached.dataset._cached) + 2 * sum(len(x) for x in b)  # cached: once per image


def test_train_on_the_fast_path_resumes_bit_identical_after_sigkill(write_recipe, tmp_path):
    """``nasreid train`` of plain OSNet on the CPU defaults (channels_last on, images cached, no workers), killed
    with SIGKILL after its first epoch and resumed, ends with the weights of an uninterrupted run, bit for bit."""
    recipe = write_recipe(FIXED)
    env = dict(os.environ, NASREID_NO_PROGRESS="1")
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "nasreid.cli", "train", str(recipe), "--out", str(ref)], env=env,
                   check=True, capture_output=True, cwd=ROOT)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "nasreid.cli", "train", str(recipe), "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    ckpt = cut / "checkpoints" / "last.pt"
    t0 = time.time()
    while not ckpt.is_file() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert ckpt.is_file(), "the run never finished an epoch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(ckpt)["epoch"] < 2, "killed too late to test a resume"
    subprocess.run([sys.executable, "-m", "nasreid.cli", "train", "--resume", str(cut)], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    a, b = load_checkpoint(ref / "model.pt")["model"], load_checkpoint(cut / "model.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
