"""PK sampler, transforms, synthetic data and the training loader."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import missing
from nasreid.data import (
    DatasetLayoutError,
    PKSampler,
    build_dataset,
    build_test_loaders,
    build_train_loader,
    build_transforms,
    render_person,
)

# --------------------------------------------------------------------------- PK sampler
PIDS = [p for p in range(12) for _ in range(1 + (p * 5) % 9)]  # 1..9 images per id, some < K


def batches(sampler, bs):
    idx = list(sampler)
    assert len(idx) == len(sampler) and len(idx) % bs == 0
    return [idx[i:i + bs] for i in range(0, len(idx), bs)]


@pytest.mark.parametrize("P,K", [(4, 4), (3, 2), (6, 1)])
def test_pk_batches_hold_p_ids_times_k(P, K):
    s = PKSampler(PIDS, num_instances=K, batch_size=P * K, seed=0)
    bs = batches(s, P * K)
    assert bs
    for b in bs:
        counts = Counter(PIDS[i] for i in b)
        assert len(counts) == P and set(counts.values()) == {K}


def test_pk_small_ids_sampled_with_replacement():
    pids = [0] * 1 + [1] * 2 + [2] * 8 + [3] * 8
    s = PKSampler(pids, num_instances=4, batch_size=8, seed=3)
    seen = Counter()
    for epoch in range(10):
        s.set_epoch(epoch)
        for b in batches(s, 8):
            seen.update(pids[i] for i in b)
    assert seen[0] > 0 and seen[1] > 0  # ids with < K images still appear (with repeats)


def test_pk_deterministic_per_seed_and_epoch():
    a, b = PKSampler(PIDS, 4, 16, seed=7), PKSampler(PIDS, 4, 16, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(PKSampler(PIDS, 4, 16, seed=8)) != list(PKSampler(PIDS, 4, 16, seed=7))


def test_pk_errors():
    with pytest.raises(ValueError, match="at least P=4"):
        PKSampler([0, 0, 1, 1, 2, 2], num_instances=2, batch_size=8)
    with pytest.raises(ValueError, match="multiple"):
        PKSampler(PIDS, num_instances=4, batch_size=10)
    with pytest.raises(ValueError, match="num_instances"):
        PKSampler(PIDS, num_instances=0, batch_size=8)


# --------------------------------------------------------------------------- transforms
@pytest.fixture(scope="module")
def real_image(shared_data) -> Image.Image:
    path = shared_data / "cuhk01" / "campus" / "0001001.png"
    if not path.is_file():
        missing(f"cuhk01 not present in {shared_data}")
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("is_train", [True, False])
def test_transforms_output_float_tensor(real_image, is_train):
    t = build_transforms(128, 64, is_train=is_train, color_jitter=True, random_erasing=True, pad=10)
    torch.manual_seed(0)
    out = t(real_image)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 128, 64)
    assert torch.isfinite(out).all()


def test_test_transform_normalises_deterministically(real_image):
    t = build_transforms(160, 60, is_train=False)
    a, b = t(real_image), t(real_image)
    assert torch.equal(a, b)
    raw = torch.from_numpy(np.array(real_image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(a, (raw - mean) / std, atol=1e-5)  # same size: resize is the identity


def test_transform_flip_only(real_image):
    t = build_transforms(160, 60, is_train=True, flip=True)
    base = build_transforms(160, 60, is_train=False)(real_image)
    outs = [t(real_image) for _ in range(20)]
    assert all(torch.equal(o, base) or torch.equal(o, base.flip(-1)) for o in outs)
    assert any(torch.equal(o, base.flip(-1)) for o in outs)


def test_transform_errors():
    with pytest.raises(ValueError, match="height"):
        build_transforms(0, 64, is_train=True)
    with pytest.raises(ValueError, match="pad"):
        build_transforms(128, 64, is_train=True, pad=-1)


# --------------------------------------------------------------------------- synthetic data
def test_synthetic_records_and_determinism():
    kw = dict(num_ids=10, images_per_id_per_cam=2, num_cams=3, seed=5, num_train_ids=6)
    ds = build_dataset("synthetic", **kw)
    assert ds.num_train_pids == 6 and len(ds.train) == 6 * 3 * 2 and ds.num_train_cams == 3
    assert len(ds.query) == 4 * 3 and len(ds.gallery) == 4 * 3
    assert all(r.path.startswith("synthetic://5/") for r in ds.train + ds.query + ds.gallery)
    assert {r.pid for r in ds.query} == {6, 7, 8, 9} == {r.pid for r in ds.gallery}
    again = build_dataset("synthetic", **kw)
    for r in ds.query[:5]:
        a, b = np.asarray(ds.read_image(r)), np.asarray(again.read_image(r))
        assert a.shape == (128, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    other = build_dataset("synthetic", **{**kw, "seed": 6})
    assert not np.array_equal(np.asarray(other.read_image(other.query[0])), np.asarray(ds.read_image(ds.query[0])))
    single = build_dataset("synthetic", num_ids=6, images_per_id_per_cam=1, num_cams=2, num_train_ids=2)
    assert len(single.query) == 4 and len(single.gallery) == 4
    assert all(q.camid != g.camid for q in single.query for g in single.gallery if q.pid == g.pid)
    with pytest.raises(DatasetLayoutError, match="num_cams"):
        build_dataset("synthetic", num_cams=1)
    with pytest.raises(DatasetLayoutError, match="num_train_ids"):
        build_dataset("synthetic", num_ids=4, num_train_ids=4)


def torso_colour(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape[:2]
    return a[int(0.3 * h):int(0.45 * h), int(0.4 * w):int(0.6 * w)].reshape(-1, 3).mean(0)


def test_synthetic_identity_consistent_across_cameras():
    n_ids, n_cams = 16, 4
    feats = np.stack([
        np.stack([torso_colour(render_person(0, p, c, 1)) for c in range(n_cams)]) for p in range(n_ids)
    ])  # (ids, cams, 3)
    within = np.mean([np.linalg.norm(feats[p, c] - feats[p, d])
                      for p in range(n_ids) for c in range(n_cams) for d in range(n_cams) if c < d])
    between = np.mean([np.linalg.norm(feats[p, c] - feats[q, c])
                       for p in range(n_ids) for q in range(n_ids) if p < q for c in range(n_cams)])
    assert within < 0.6 * between
    # nearest neighbour across cameras by raw torso colour alone is far above chance (1/16)
    hits = tot = 0
    for c in range(n_cams):
        for d in range(n_cams):
            if c != d:
                for p in range(n_ids):
                    hits += int(np.argmin(np.linalg.norm(feats[:, d] - feats[p, c], axis=1)) == p)
                    tot += 1
    assert hits / tot > 0.3


def test_synthetic_cameras_differ():
    n_ids = 12
    imgs = {c: [np.asarray(render_person(0, p, c, 0), dtype=np.float64) for p in range(n_ids)] for c in range(4)}
    for p in range(3):
        assert not np.array_equal(imgs[0][p], imgs[1][p])
    # camera-level statistics (brightness / colour of background and people) differ between cameras
    cam_mean = np.stack([np.mean([im.mean((0, 1)) for im in imgs[c]], 0) for c in range(4)])
    spread = max(np.linalg.norm(cam_mean[c] - cam_mean[d]) for c in range(4) for d in range(4))
    assert spread > 5.0
    # per-image jitter: two images of the same id and camera are not identical
    assert not np.array_equal(np.asarray(render_person(0, 0, 0, 0)), np.asarray(render_person(0, 0, 0, 1)))


def test_synthetic_camera_style_off_by_default_and_deterministic():
    # camera_style=0 (the default) is the original rendering; the dataset passes its camera_style to the renderer
    for p, c in ((0, 0), (3, 2)):
        default = np.asarray(render_person(0, p, c, 1))
        assert np.array_equal(default, np.asarray(render_person(0, p, c, 1, camera_style=0)))
        styled = np.asarray(render_person(0, p, c, 1, camera_style=1))
        assert np.array_equal(styled, np.asarray(render_person(0, p, c, 1, camera_style=1.0)))
        assert not np.array_equal(styled, default)
    ds = build_dataset("synthetic", num_ids=6, num_cams=2, num_train_ids=3, seed=2, camera_style=0.7)
    r = ds.query[1]
    _, pid, cam, idx = (int(x) for x in r.path[len("synthetic://"):].split("/"))
    assert np.array_equal(np.asarray(ds.read_image(r)), np.asarray(render_person(2, pid, cam, idx, camera_style=0.7)))
    with pytest.raises(DatasetLayoutError, match="camera_style"):
        build_dataset("synthetic", camera_style=-1)


def _log_colour_stats(img: Image.Image) -> np.ndarray:
    """log of the per-channel mean and std of an image: the statistics instance normalisation removes."""
    a = np.asarray(img, dtype=np.float64)
    return np.concatenate([np.log(a.mean((0, 1))), np.log(a.std((0, 1)))])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_camera_style_is_a_per_camera_shift(seed):
    # the style shift (styled minus unstyled image statistics, same person and pose) is a property of the camera:
    # every pair of cameras differs by more than twice the largest spread of the shift over identities in a camera
    n_ids, n_cams = 12, 4
    shift = np.array([[_log_colour_stats(render_person(seed, p, c, 0, camera_style=1))
                       - _log_colour_stats(render_person(seed, p, c, 0)) for c in range(n_cams)] for p in range(n_ids)])
    cam_shift = shift.mean(0)
    within = max(np.linalg.norm(shift[:, c] - cam_shift[c], axis=1).mean() for c in range(n_cams))
    between = min(np.linalg.norm(cam_shift[c] - cam_shift[d]) for c in range(n_cams) for d in range(c + 1, n_cams))
    assert between > 2.0 * within, (between, within)


def _cross_camera_nn_hits(feats: np.ndarray) -> float:
    """Fraction of (id, camera c, camera d != c) whose nearest identity in camera d is itself; feats (ids, cams, k)."""
    n_ids, n_cams = feats.shape[:2]
    hits = [int(np.argmin(np.linalg.norm(feats[:, d] - feats[p, c], axis=1)) == p)
            for c in range(n_cams) for d in range(n_cams) if c != d for p in range(n_ids)]
    return float(np.mean(hits))


def test_synthetic_camera_style_is_removed_by_instance_normalisation():
    # Strong camera style hides identity from raw colour across cameras, and standardising each image's channels
    # (what instance normalisation does) gives it back: the shift is a style shift, so IN placement matters.
    n_ids, n_cams = 16, 4
    raw, normed = {0.0: [], 1.0: []}, {0.0: [], 1.0: []}
    for seed in (0, 1, 2):
        for style in (0.0, 1.0):
            imgs = np.array([[np.asarray(render_person(seed, p, c, 1, camera_style=style), dtype=np.float64)
                              for c in range(n_cams)] for p in range(n_ids)])  # (ids, cams, H, W, 3)
            torso = np.stack([[torso_colour(Image.fromarray(im.astype(np.uint8))) for im in row] for row in imgs])
            mean, std = imgs.mean((2, 3)), imgs.std((2, 3))
            raw[style].append(_cross_camera_nn_hits(torso))
            normed[style].append(_cross_camera_nn_hits((torso - mean) / std))
    raw0, raw1, in0, in1 = (np.mean(x) for x in (raw[0.0], raw[1.0], normed[0.0], normed[1.0]))
    assert raw1 < 0.3 and raw1 < 0.6 * raw0, (raw0, raw1)  # chance is 1/16
    assert in1 > 0.4 and in1 > 0.9 * in0 and in1 > 2 * raw1, (in0, in1, raw1)


# --------------------------------------------------------------------------- loaders end to end
def test_train_loader_pk_batches_on_synthetic():
    ds = build_dataset("synthetic", num_ids=16, images_per_id_per_cam=2, num_cams=2, num_train_ids=8)
    loader = build_train_loader(ds, height=64, width=32, batch_size=12, num_instances=3, seed=1,
                                random_erasing=True, pad=2)
    assert loader.drop_last
    n = 0
    for batch in loader:
        assert batch["img"].shape == (12, 3, 64, 32) and batch["img"].dtype == torch.float32
        counts = Counter(batch["pid"].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        assert set(batch) == {"img", "pid", "camid", "dsetid", "path", "index", "frame"}
        n += 1
    assert n == len(loader) > 0
    loader.sampler.set_epoch(0)
    first = [b["index"].tolist() for b in loader]
    again = build_train_loader(ds, height=64, width=32, batch_size=12, num_instances=3, seed=1)
    assert [b["index"].tolist() for b in again] == first
    with pytest.raises(ValueError, match="at least P"):
        build_train_loader(ds, height=64, width=32, batch_size=40, num_instances=4)
    q, g = build_test_loaders(ds, height=64, width=32, batch_size=7)
    assert sum(len(b["pid"]) for b in q) == len(ds.query)
    assert [p for b in g for p in b["path"]] == [r.path for r in ds.gallery]
