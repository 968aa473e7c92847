"""Dataset parsers on real images: name parsing, official layouts rebuilt in tmp_path, CUHK01, corrupt files."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from _trees import build_market_tree, cuhk_png, duke_name, market_name, to_jpg
from conftest import missing
from nasreid.data import (
    CorruptImageError,
    DatasetLayoutError,
    ImageDataset,
    ImageRecord,
    ReIDDataset,
    build_dataset,
    build_test_loaders,
    build_train_loader,
    parse_market1501_name,
    parse_msmt17_name,
    register_dataset,
)
from nasreid.data.datasets.msmt17 import msmt17_frame
from nasreid.evaluation import evaluate_model
from nasreid.registry import RegistryError

MARKET_NAME = re.compile(r"^(\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
MSMT_NAME = re.compile(r"^(\d{4})_(\d{3})_(\d{2})_\d{4}(morning|noon|afternoon)_\d{4}_\d(_ex)?\.jpg$")


@pytest.fixture(scope="module")
def market_samples(shared_data) -> list[Path]:
    files = sorted((shared_data / "market1501_samples" / "visual_data").rglob("*.jpg"))
    if not files:
        missing(f"market1501_samples not present in {shared_data}")
    return files


# --------------------------------------------------------------------------- name parsers on real names
def test_parse_real_market_names(market_samples):
    parsed = 0
    for f in market_samples:
        m = MARKET_NAME.match(f.name)
        if m:
            pid, camid, seq, frame, box = parse_market1501_name(f.name)
            assert (pid, camid + 1, seq, frame, box) == tuple(int(g) for g in m.groups())
            # full paths are accepted too
            assert parse_market1501_name(f)[0] == pid
            parsed += 1
        else:
            with pytest.raises(ValueError) as ei:
                parse_market1501_name(f.name)
            assert f.name in str(ei.value)
    assert parsed >= 40
    assert parse_market1501_name("0400_c2s1_046426_00.jpg") == (400, 1, 1, 46426, 0)
    assert parse_market1501_name("0000_c3s1_107067_00.jpg") == (0, 2, 1, 107067, 0)
    assert parse_market1501_name("-1_c1s1_000401_03.jpg") == (-1, 0, 1, 401, 3)


@pytest.mark.parametrize(
    "name",
    ["bbb.jpg", "b0387_c2s1_090996_00.jpg", "back0100_c3s2_115894_00.jpg", "l0155_c3s1_025176_00.jpg",
     "045_388_gan0734_c3s2_064678_06.jpg", "0318_001_01_0303noon_0111_4_ex.jpg", "0001_c0s1_000001_00.jpg"],
)
def test_market_parser_rejects_real_nonmatching_names(market_samples, name):
    if name.startswith(("bbb", "b0387", "back0100", "l0155", "045_")):
        assert any(f.name == name for f in market_samples), f"{name} expected among the real samples"
    with pytest.raises(ValueError, match=re.escape(name)):
        parse_market1501_name(name)


def test_parse_real_msmt17_names(market_samples):
    assert parse_msmt17_name("0318_001_01_0303noon_0111_4_ex.jpg") == (318, 0)
    assert parse_msmt17_name("0917_021_15_0113morning_0174_0.jpg") == (917, 14)
    msmt = [f for f in market_samples if MSMT_NAME.match(f.name)]
    assert len(msmt) >= 10
    for f in msmt:
        pid, camid = parse_msmt17_name(f)
        assert pid == int(f.name[:4]) and camid == int(f.name.split("_")[2]) - 1
        assert 0 <= camid <= 14
        assert msmt17_frame(f) == int(f.name.split("_")[4])
    assert msmt17_frame("0367_010_10_0303noon_0606_2.jpg") == 606
    for bad in ("0400_c2s1_046426_00.jpg", "bbb.jpg", "0318_001_16_0303noon_0111_4_ex.jpg"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_msmt17_name(bad)
        with pytest.raises(ValueError, match=re.escape(bad)):
            msmt17_frame(bad)


def test_image_record_fields():
    rec = ImageRecord("a.jpg", 3, 1)
    assert (rec.dsetid, rec.seq, rec.frame, rec.time) == (0, None, None, None)
    assert ImageRecord("a.jpg", 3, 1, 2).dsetid == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.frame = 5


def _market_sample_tree(root: Path, market_samples) -> dict[str, Path]:
    """Evaluation-only Market tree (no bounding_box_train) of the real Market-named samples: one image of each
    of the two ids seen by two cameras (0051, 1285) is a query, every other image is in the gallery."""
    files = {}
    for f in market_samples:
        if MARKET_NAME.match(f.name):
            files.setdefault(f.name, f)
    queries = {"0051_c3s1_005551_00.jpg", "1285_c1s5_053991_00.jpg"}
    for name, f in files.items():
        dst = root / ("query" if name in queries else "bounding_box_test") / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    return files


def test_market1501_frames_on_real_names_eval_only(tmp_path, market_samples):
    root = tmp_path / "market1501"
    files = _market_sample_tree(root, market_samples)
    with pytest.raises(DatasetLayoutError, match="bounding_box_train"):
        build_dataset("market1501", root)
    ds = build_dataset("market1501", root, eval_only=True)
    assert ds.train == [] and ds.num_train_pids == 0
    assert len(ds.query) == 2 and len(ds.query) + len(ds.gallery) == len(files) >= 50
    for r in ds.query + ds.gallery:
        pid, cam, seq, frame, _ = (int(g) for g in MARKET_NAME.match(Path(r.path).name).groups())
        assert (r.pid, r.camid, r.seq, r.frame, r.time) == (pid, cam - 1, seq, frame, None)
    by_name = {Path(r.path).name: r for r in ds.query + ds.gallery}
    assert (by_name["0400_c2s1_046426_00.jpg"].seq, by_name["0400_c2s1_046426_00.jpg"].frame) == (1, 46426)
    assert (by_name["1285_c1s5_053991_00.jpg"].seq, by_name["1285_c1s5_053991_00.jpg"].frame) == (5, 53991)
    assert (by_name["0223_c1s6_014296_00.jpg"].seq, by_name["0223_c1s6_014296_00.jpg"].frame) == (6, 14296)
    assert by_name["0000_c3s1_107067_00.jpg"].pid == 0  # a distractor stays in the gallery

    q, g = build_test_loaders(ds, height=32, width=16, batch_size=16)
    assert [f for b in g for f in b["frame"].tolist()] == [r.frame for r in ds.gallery]
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten())  # fixed, nothing learned
    res = evaluate_model(model, q, g, progress=False)
    assert res["num_valid_queries"] == 2 and res["num_skipped_queries"] == 0 and res["num_gallery"] == len(files) - 2


def test_market1501_layout(market_root):
    ds = build_dataset("market1501", market_root)
    assert isinstance(ds, ReIDDataset) and ds.name == "market1501"
    assert len(ds.train) == 24 and ds.num_train_pids == 6 and ds.num_train_cams == 2
    assert sorted({r.pid for r in ds.train}) == list(range(6))  # relabelled, junk + distractor dropped
    assert all(Path(r.path).name[:4] != "0000" and not Path(r.path).name.startswith("-1") for r in ds.train)
    # relabel is in sorted order of the original pid
    first = [r for r in ds.train if r.pid == 0]
    assert all(Path(r.path).name.startswith("0001_") for r in first)
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.train} == {0, 1}
    assert sorted({r.pid for r in ds.query}) == [7, 8, 9, 10]
    gpids = {r.pid for r in ds.gallery}
    assert {-1, 0} <= gpids and {7, 8, 9, 10} <= gpids  # junk and distractor kept in the gallery
    assert len(ds.gallery) == 10 and all(r.dsetid == 0 for r in ds.gallery)
    img = ds.read_image(ds.query[0])
    assert img.mode == "RGB" and img.size == (60, 160)
    text = ds.summary()
    assert "train" in text and "gallery" in text and "24" in text
    # the root as the log shows it: relative to the current folder, so a committed log names no machine path
    assert text.splitlines()[0] == f"=> market1501 ({os.path.relpath(market_root)})"
    assert Path(ds.root).is_absolute() and not os.path.relpath(market_root).startswith("/")


def test_market1501_bad_name_strict_and_lenient(market_root, cuhk01_dir):
    to_jpg(cuhk_png(cuhk01_dir, 30, 1), market_root / "bounding_box_train" / "bbb.jpg")
    with pytest.raises(DatasetLayoutError, match="bbb.jpg"):
        build_dataset("market1501", market_root)
    with pytest.warns(UserWarning, match="bbb.jpg"):
        ds = build_dataset("market1501", market_root, strict=False)
    assert len(ds.train) == 24


def test_market1501_missing_root_folder_and_empty_split(tmp_path, market_root):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetLayoutError, match=re.escape(str(missing))):
        build_dataset("market1501", missing)
    shutil.rmtree(market_root / "query")
    with pytest.raises(DatasetLayoutError, match="query"):
        build_dataset("market1501", market_root)
    (market_root / "query").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"split 'query' is empty.*" + re.escape(str(market_root))):
        build_dataset("market1501", market_root)


def test_default_root_from_env(monkeypatch, tmp_path, market_root, shared_data):
    monkeypatch.setenv("NASREID_DATA", str(market_root.parent))
    assert build_dataset("market1501").num_train_pids == 6
    monkeypatch.setenv("NASREID_DATA", str(tmp_path / "empty"))
    with pytest.raises(DatasetLayoutError, match="empty"):
        build_dataset("market1501")
    monkeypatch.delenv("NASREID_DATA")
    with pytest.raises(DatasetLayoutError, match="NASREID_DATA"):
        build_dataset("cuhk01")
    with pytest.raises(KeyError, match="market1501"):
        build_dataset("no_such_dataset")


def test_dsetid_and_registry(market_root):
    ds = build_dataset("market1501", market_root, dsetid=2)
    assert {r.dsetid for r in ds.train + ds.query + ds.gallery} == {2}

    @register_dataset("tiny_test_layout")
    def tiny(root=None):
        rec = ImageRecord("synthetic://0/0/0/0", 0, 0)
        return ReIDDataset("tiny", [rec], [rec], [rec])

    assert build_dataset("tiny_test_layout").name == "tiny"
    with pytest.raises(RegistryError, match="tiny_test_layout"):  # a NasreidError + KeyError, not a ValueError
        register_dataset("tiny_test_layout")(lambda root=None: None)


# --------------------------------------------------------------------------- other official layouts
def test_dukemtmc_layout(tmp_path, cuhk01_dir):
    root = tmp_path / "duke"
    build_market_tree(root, cuhk01_dir, duke_name)
    ds = build_dataset("dukemtmc", root)
    assert ds.num_train_pids == 6 and len(ds.train) == 24
    assert sorted({r.pid for r in ds.query}) == [7, 8, 9, 10]
    assert {r.camid for r in ds.gallery} == {1}
    assert all(r.frame == int(Path(r.path).stem.split("_f")[1]) and r.seq is None for r in ds.train + ds.gallery)
    assert sorted(r.frame for r in ds.gallery) == [3, 3, 3, 3, 4, 4, 4, 4]
    # a Market-style name is not a Duke name
    to_jpg(cuhk_png(cuhk01_dir, 30, 1), root / "query" / "0030_c1s1_000001_00.jpg")
    with pytest.raises(DatasetLayoutError, match="0030_c1s1_000001_00.jpg"):
        build_dataset("dukemtmc", root)
    (root / "query" / "0030_c1s1_000001_00.jpg").unlink()
    shutil.rmtree(root / "bounding_box_train")  # an evaluation-only target
    target = build_dataset("dukemtmc", root, eval_only=True)
    assert target.train == [] and target.gallery == ds.gallery and target.query == ds.query


def test_cuhk03np_layout(tmp_path, cuhk01_dir):
    root = tmp_path / "cuhk03np"
    build_market_tree(root / "labeled", cuhk01_dir, market_name)
    # the short CUHK03-NP naming PPPP_cC_N.png is accepted too
    shutil.copy(cuhk_png(cuhk01_dir, 11, 1), root / "labeled" / "query" / "0011_c1_1.png")
    ds = build_dataset("cuhk03np", root, variant="labeled")
    assert ds.num_train_pids == 6 and sorted({r.pid for r in ds.query}) == [7, 8, 9, 10, 11]
    assert all(r.camid == 0 for r in ds.query)
    frames = {Path(r.path).name: (r.seq, r.frame) for r in ds.query}
    assert frames["0007_c1s1_000001_00.jpg"] == (1, 1) and frames["0011_c1_1.png"] == (None, None)
    shutil.rmtree(root / "labeled" / "bounding_box_train")
    with pytest.raises(DatasetLayoutError, match="bounding_box_train"):
        build_dataset("cuhk03np", root)
    assert build_dataset("cuhk03np", root, eval_only=True).query == ds.query
    with pytest.raises(DatasetLayoutError, match="detected"):
        build_dataset("cuhk03np", root, variant="detected")
    with pytest.raises(DatasetLayoutError, match="'bogus'"):
        build_dataset("cuhk03np", root, variant="bogus")


def msmt_name(pid, cam, idx, ex=False):
    return f"{pid:04d}_{idx:03d}_{cam:02d}_0303morning_{idx:04d}_0{'_ex' if ex else ''}.jpg"


def build_msmt_tree(root: Path, cuhk01_dir: Path, test_pids=range(100, 103)) -> None:
    """Train ids 0..3 (CUHK01 ids 1..4): images 1, 3 in list_train, 2, 4 in list_val; test ids ``test_pids``
    (CUHK01 ids 100..102): image 1 is the query, 2..4 the gallery."""
    lines = {"train": [], "val": [], "query": [], "gallery": []}
    for pid in range(0, 4):
        for idx in range(1, 5):
            cam = 1 if idx <= 2 else 15
            rel = f"{pid:04d}/{msmt_name(pid, cam, idx)}"
            to_jpg(cuhk_png(cuhk01_dir, pid + 1, idx), root / "train" / rel)
            lines["train" if idx % 2 else "val"].append(f"{rel} {pid}")
    for src, pid in enumerate(test_pids, 100):
        for idx in range(1, 5):
            cam = 3 if idx <= 2 else 7
            rel = f"{pid:04d}/{msmt_name(pid, cam, idx, ex=idx == 1)}"
            to_jpg(cuhk_png(cuhk01_dir, src, idx), root / "test" / rel)
            lines["query" if idx == 1 else "gallery"].append(f"{rel} {pid}")
    for split, ls in lines.items():
        (root / f"list_{split}.txt").write_text("\n".join(ls) + "\n")


def test_msmt17_list_files(tmp_path, cuhk01_dir):
    root = tmp_path / "msmt17"
    build_msmt_tree(root, cuhk01_dir)

    ds = build_dataset("msmt17", root)
    assert len(ds.train) == 16 and ds.num_train_pids == 4
    assert {r.camid for r in ds.train} == {0, 14}
    assert {r.pid for r in ds.query} == {100, 101, 102} and {r.camid for r in ds.query} == {2}
    assert {r.camid for r in ds.gallery} == {2, 6} and len(ds.gallery) == 9
    assert ds.read_image(ds.gallery[0]).mode == "RGB"
    assert all(r.frame == int(Path(r.path).name.split("_")[4]) for r in ds.train + ds.query + ds.gallery)
    assert sorted({r.frame for r in ds.gallery}) == [2, 3, 4]
    no_val = build_dataset("msmt17", root, merge_val=False)
    assert len(no_val.train) == 8

    # a listed image that does not exist: error names list file, line and image
    with open(root / "list_query.txt", "a") as fh:
        fh.write("0999/" + msmt_name(999, 2, 1) + " 999\n")
    with pytest.raises(DatasetLayoutError, match=r"list_query\.txt:4.*0999_001_02"):
        build_dataset("msmt17", root)
    (root / "list_query.txt").write_text("0100/bbb.jpg 100\n")
    with pytest.raises(DatasetLayoutError, match="bbb.jpg"):
        build_dataset("msmt17", root)
    (root / "list_query.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="list_query.txt"):
        build_dataset("msmt17", root)


def test_msmt17_combine_all(tmp_path, cuhk01_dir):
    root = tmp_path / "msmt17"
    build_msmt_tree(root, cuhk01_dir, test_pids=(1, 2, 3))  # test pids reuse train pid numbers, as in MSMT17
    plain = build_dataset("msmt17", root)
    ds = build_dataset("msmt17", root, combine_all=True)
    assert len(ds.train) == 16 + 12 and ds.num_train_pids == 4 + 3
    assert sorted({r.pid for r in ds.train}) == list(range(7))
    assert ds.query == plain.query and ds.gallery == plain.gallery  # still the test split, original pids
    assert {r.pid for r in ds.query} == {1, 2, 3}
    # no collision: every combined id holds the images of one real person (one CUHK01 source id)
    source = {}
    for r in ds.train:
        split = Path(r.path).parts[-3]  # "train" or "test"
        source.setdefault(r.pid, set()).add((split, Path(r.path).parent.name))
    assert all(len(v) == 1 for v in source.values())
    test_ids = {(Path(r.path).parent.name, r.pid) for r in ds.train if Path(r.path).parts[-3] == "test"}
    assert test_ids == {("0001", 4), ("0002", 5), ("0003", 6)}  # after train's 0..3, in order of the test pid
    assert len(build_dataset("msmt17", root, combine_all=True, merge_val=False).train) == 28  # val is included
    with pytest.raises(DatasetLayoutError, match="combine_all"):
        build_dataset("msmt17", root, combine_all=True, eval_only=True)


def test_msmt17_eval_only(tmp_path, cuhk01_dir):
    root = tmp_path / "msmt17"
    build_msmt_tree(root, cuhk01_dir)
    (root / "list_train.txt").unlink()
    (root / "list_val.txt").unlink()
    shutil.rmtree(root / "train")
    with pytest.raises(DatasetLayoutError, match="list_train.txt"):
        build_dataset("msmt17", root)
    ds = build_dataset("msmt17", root, eval_only=True)
    assert ds.train == [] and len(ds.query) == 3 and len(ds.gallery) == 9


def test_eval_only_ignored_by_layouts_with_every_split(cuhk01_dir):
    ds = build_dataset("cuhk01", cuhk01_dir.parent, max_ids=10, eval_only=True)
    assert ds.num_train_pids == 5 and ds.query and ds.gallery
    syn = build_dataset("synthetic", num_ids=4, num_cams=2, images_per_id_per_cam=2, eval_only=True)
    assert syn.num_train_pids == 2


def test_market1501_eval_only_target_without_train_folder(market_root):
    shutil.rmtree(market_root / "bounding_box_train")
    with pytest.raises(DatasetLayoutError, match="bounding_box_train"):
        build_dataset("market1501", market_root)
    ds = build_dataset("market1501", market_root, eval_only=True, dsetid=1)
    assert ds.train == [] and ds.num_train_pids == 0 and len(ds.query) == 4 and len(ds.gallery) == 10
    assert {r.dsetid for r in ds.query + ds.gallery} == {1}
    assert "train" in ds.summary()


# --------------------------------------------------------------------------- generic folder / CSV layout
def test_folder_layout_tree_and_csv(tmp_path, cuhk01_dir):
    root = tmp_path / "custom"
    for split, pids in (("train", (1, 2, 3)), ("query", (4, 5)), ("gallery", (4, 5, 6))):
        for pid in pids:
            for cam, idx in ((0, 1), (1, 3)):
                if split == "query" and cam == 1:
                    continue
                dst = root / split / f"{pid:03d}" / f"{cam}_img{idx}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(cuhk_png(cuhk01_dir, pid, idx), dst)
    ds = build_dataset("folder", root)
    assert ds.num_train_pids == 3 and len(ds.train) == 6 and ds.num_train_cams == 2
    assert sorted({r.pid for r in ds.gallery}) == [4, 5, 6]
    assert {r.camid for r in ds.query} == {0}

    # CSV overrides the folder for that split
    (root / "query.csv").write_text(f"path,pid,camid\nquery/004/0_img1.png,4,0\n{root}/gallery/005/1_img3.png,5,1\n")
    ds = build_dataset("folder", root)
    assert [(r.pid, r.camid) for r in ds.query] == [(4, 0), (5, 1)]
    (root / "query.csv").write_text("path,pid,camid\nquery/004/0_img1.png,four,0\n")
    with pytest.raises(DatasetLayoutError, match=r"query\.csv:2.*'four'"):
        build_dataset("folder", root)
    (root / "query.csv").write_text("file,pid\n")
    with pytest.raises(DatasetLayoutError, match=r"query\.csv.*camid"):
        build_dataset("folder", root)
    (root / "query.csv").unlink()

    ds = build_dataset("folder", root)
    target = build_dataset("folder", root, eval_only=True)  # the train split is not read
    assert target.train == [] and target.query == ds.query and target.gallery == ds.gallery

    bad = root / "train" / "001" / "cam0.png"
    shutil.copy(cuhk_png(cuhk01_dir, 1, 2), bad)
    with pytest.raises(DatasetLayoutError, match="cam0.png"):
        build_dataset("folder", root)
    bad.unlink()
    (root / "train" / "alice").mkdir()
    with pytest.raises(DatasetLayoutError, match="alice"):
        build_dataset("folder", root)
    shutil.rmtree(root / "train")
    with pytest.raises(DatasetLayoutError, match="split 'train'"):
        build_dataset("folder", root)
    assert build_dataset("folder", root, eval_only=True).gallery == ds.gallery


# --------------------------------------------------------------------------- CUHK01 on the real folder
def test_cuhk01_real_protocol(cuhk01_dir):
    root = cuhk01_dir.parent
    ds = build_dataset("cuhk01", root)
    assert len(ds.train) + len(ds.query) + len(ds.gallery) == 3884
    train_ids = {Path(r.path).name[:4] for r in ds.train}
    test_ids = {r.pid for r in ds.query}
    assert len(train_ids) + len(test_ids) == 971
    assert ds.num_train_pids == 485 and len(test_ids) == 486 and len(ds.train) == 485 * 4
    assert not {int(t) for t in train_ids} & test_ids
    assert {r.pid for r in ds.gallery} == test_ids
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
    assert len(ds.query) == len(ds.gallery) == 486 * 2
    for r in ds.query[:20]:
        assert Path(r.path).name[4:7] in ("001", "002") and int(Path(r.path).name[:4]) == r.pid

    again = build_dataset("cuhk01", root, split_seed=0)
    assert again.train == ds.train and again.query == ds.query and again.gallery == ds.gallery
    other = build_dataset("cuhk01", root, split_seed=1)
    assert {r.pid for r in other.query} != test_ids
    flipped = build_dataset("cuhk01", root, query_cam="B")
    assert {r.camid for r in flipped.query} == {1} and {r.pid for r in flipped.query} == test_ids

    small = build_dataset("cuhk01", root, max_ids=100)
    assert small.num_train_pids == 50 and len({r.pid for r in small.query}) == 50
    assert len(small.train) == 200
    with pytest.raises(DatasetLayoutError, match="query_cam"):
        build_dataset("cuhk01", root, query_cam="C")
    with pytest.raises(DatasetLayoutError, match="num_train_ids"):
        build_dataset("cuhk01", root, num_train_ids=971)


def test_cuhk01_tolerates_identical_images(cuhk01_dir):
    a, b = cuhk_png(cuhk01_dir, 458, 1), cuhk_png(cuhk01_dir, 458, 2)
    assert a.read_bytes() == b.read_bytes()  # documented quirk of the real data
    ds = build_dataset("cuhk01", cuhk01_dir.parent)
    paths = {r.path for r in ds.train + ds.query + ds.gallery}
    assert str(a) in paths and str(b) in paths


# --------------------------------------------------------------------------- corrupt images
@pytest.fixture
def corrupt_market(market_root) -> tuple[Path, Path]:
    bad = market_root / "bounding_box_train" / "0003_c1s1_000002_00.jpg"
    assert bad.is_file()
    bad.write_bytes(b"\x00garbage, not a jpeg" * 10)
    return market_root, bad


def test_corrupt_image_error_names_file(corrupt_market):
    root, bad = corrupt_market
    ds = build_dataset("market1501", root)
    rec = next(r for r in ds.train if r.path == str(bad))
    with pytest.raises(CorruptImageError, match=re.escape(bad.name)) as ei:
        ds.read_image(rec)
    assert ei.value.path == str(bad)
    data = ImageDataset(ds.train, ds.read_image, on_corrupt="error")
    idx = data.records.index(rec)
    with pytest.raises(CorruptImageError, match=re.escape(bad.name)):
        data[idx]
    with pytest.raises(ValueError, match="on_corrupt"):
        ImageDataset(ds.train, ds.read_image, on_corrupt="ignore")


def test_corrupt_image_skipped_with_warning(corrupt_market):
    root, bad = corrupt_market
    ds = build_dataset("market1501", root)
    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        data = ImageDataset(ds.train, ds.read_image, on_corrupt="skip")
    assert len(data) == len(ds.train) - 1 and str(bad) not in {r.path for r in data.records}
    assert [r.path for r in data.skipped] == [str(bad)]
    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        loader = build_train_loader(ds, height=64, width=32, batch_size=8, num_instances=4, on_corrupt="skip")
    for batch in loader:
        assert str(bad) not in batch["path"]
        assert batch["img"].shape == (8, 3, 64, 32)


def test_truncated_image_substituted_by_same_pid(market_root):
    bad = market_root / "bounding_box_train" / "0002_c1s1_000001_00.jpg"
    data_bytes = bad.read_bytes()
    bad.write_bytes(data_bytes[: len(data_bytes) // 3])  # header intact: passes verify(), fails decode
    ds = build_dataset("market1501", market_root)
    data = ImageDataset(ds.train, ds.read_image, on_corrupt="skip")
    idx = next(i for i, r in enumerate(data.records) if r.path == str(bad))
    if len(data) == len(ds.train):  # verify() did not catch it: lazy substitution keeps the label
        with pytest.warns(UserWarning, match=re.escape(bad.name)):
            item = data[idx]
        assert item["pid"] == data.records[idx].pid and item["path"] == str(bad)
    with pytest.raises(CorruptImageError, match=re.escape(bad.name)):
        ImageDataset(ds.train, ds.read_image, on_corrupt="error")[idx]


def test_corrupt_image_in_worker_names_file(corrupt_market):
    root, bad = corrupt_market
    ds = build_dataset("market1501", root)
    loader = build_train_loader(ds, height=16, width=8, batch_size=24, num_instances=4, workers=1)
    it = iter(loader)
    try:
        with pytest.raises(Exception, match=re.escape(bad.name)):
            for _ in it:
                pass
    finally:
        it._shutdown_workers()  # else torch waits 5 s at garbage collection for the errored worker


def test_test_loaders_order(market_root):
    ds = build_dataset("market1501", market_root)
    q, g = build_test_loaders(ds, height=64, width=32, batch_size=4)
    paths = [p for b in g for p in b["path"]]
    assert paths == [r.path for r in ds.gallery]
    batch = next(iter(q))
    assert batch["img"].dtype == torch.float32 and batch["img"].shape[1:] == (3, 64, 32)
    assert batch["pid"].tolist() == [r.pid for r in ds.query[:4]]
    assert batch["frame"].tolist() == [r.frame for r in ds.query[:4]] == [1, 1, 1, 1]
