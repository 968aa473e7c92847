"""nasreid.visualize: ranked-result pictures of a retrain run (a tiny untrained run folder on real CUHK01 images;
the checks are on mechanics: sizes, border colours, junk removal, distances, query choice)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _runs import make_untrained_run
from _trees import cuhk_png, market_name, to_jpg
from nasreid.config import DatasetRef
from nasreid.errors import NasreidError, RunFolderError
from nasreid.visualize import (
    MATCH_COLOR,
    MISMATCH_COLOR,
    QUERY_COLOR,
    UNKNOWN_COLOR,
    RankLayout,
    VisualizeError,
    draw_ranked_list,
    visualize_ranks,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_IDS = 24  # CUHK01 split with 12 test ids: 24 queries (camera A), 24 gallery images (camera B)
LAYOUT = RankLayout()


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data) -> Path:
    """A retrain run folder as ``nasreid train`` leaves it (recipe.yaml, genotype.json, model.pt), untrained."""
    return make_untrained_run(tmp_path_factory.mktemp("vis"), shared_data, space_kwargs={"width_mult": 0.25},
                              cuhk01={"split_seed": 0, "max_ids": MAX_IDS}, perturb_bn=False)


@pytest.fixture(scope="module")
def junk_target(tmp_path_factory, cuhk01_dir) -> Path:
    """Market-1501 test split from CUHK01 ids 1..5: query = camera-A image 1; gallery = camera-A image 2 (same pid,
    same camera: junk), camera-B images 3 and 4, plus a pid -1 junk image and a distractor (pid 0000)."""
    root = tmp_path_factory.mktemp("market") / "market1501"
    for pid in range(1, 6):
        to_jpg(cuhk_png(cuhk01_dir, pid, 1), root / "query" / market_name(pid, 1, 1))
        for idx in (2, 3, 4):
            cam = 1 if idx == 2 else 2
            to_jpg(cuhk_png(cuhk01_dir, pid, idx), root / "bounding_box_test" / market_name(pid, cam, idx))
    to_jpg(cuhk_png(cuhk01_dir, 20, 1), root / "bounding_box_test" / "-1_c1s1_000020_00.jpg")
    to_jpg(cuhk_png(cuhk01_dir, 21, 1), root / "bounding_box_test" / "0000_c2s1_000021_00.jpg")
    return root


def _border_pixels(img: Image.Image, box, dx=0, dy=0) -> set:
    """Colours of sample pixels in the border of a tile (corners and the middle of each side)."""
    x0, y0, x1, y1 = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
    b = LAYOUT.border
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    pts = [(x0, y0), (x1 - 1, y1 - 1), (x0 + b - 1, ym), (x1 - b, ym), (xm, y0 + b - 1), (xm, y1 - b)]
    return {img.getpixel(p) for p in pts}


def _load(out: Path) -> dict:
    return json.loads((out / "ranks.json").read_text())


def test_pictures_sizes_and_border_colours_follow_ranks_json(run):
    from nasreid.data import parse_cuhk01_name

    files = visualize_ranks(run, query_ids=[0, 5], topk=MAX_IDS)  # the whole gallery: both true matches drawn
    out = run / "ranks"
    assert [f.name for f in files] == ["query_0.png", "query_5.png", "ranks.png", "ranks.json"]
    assert all(f.is_file() for f in files)
    rep = _load(out)
    w, h = LAYOUT.row_size(MAX_IDS)
    assert rep["layout"]["row_size"] == [w, h] and rep["topk"] == MAX_IDS and rep["protocol"] == "same-domain"
    overview = Image.open(out / "ranks.png").convert("RGB")
    assert overview.size == (w, 2 * h)
    for q in rep["queries"]:
        img = Image.open(out / q["image"]).convert("RGB")
        assert img.size == (w, h)
        assert _border_pixels(img, LAYOUT.box(0)) == {QUERY_COLOR}
        q_pid, q_cam, _ = parse_cuhk01_name(q["path"])
        assert (q["pid"], q["camid"]) == (q_pid, q_cam)
        assert len(q["ranked"]) == MAX_IDS and [e["rank"] for e in q["ranked"]] == list(range(1, MAX_IDS + 1))
        for e in q["ranked"]:
            assert e["pid"] == parse_cuhk01_name(e["path"])[0] and e["match"] == (e["pid"] == q_pid)
            want = MATCH_COLOR if e["match"] else MISMATCH_COLOR
            assert tuple(e["box"]) == LAYOUT.box(e["rank"])
            assert _border_pixels(img, e["box"]) == {want}
            assert _border_pixels(overview, e["box"], *q["offset"]) == {want}
        assert sum(e["match"] for e in q["ranked"]) == q["num_positives"] == 2  # CUHK01: 2 images per camera
        assert q["num_junk"] == 0 and q["first_match_rank"] == min(e["rank"] for e in q["ranked"] if e["match"])


def test_distances_ascend_and_equal_a_direct_cosine(run):
    from nasreid.data import build_dataset, build_test_loaders
    from nasreid.engine.pipeline import load_run_model
    from nasreid.evaluation import extract_features

    out = run / "ranks_direct"
    visualize_ranks(run, queries=3, topk=8, out=out, seed=3)
    rep = _load(out)
    model, recipe, _ = load_run_model(run)
    ds = build_dataset("cuhk01", recipe.data.dataset.root, **recipe.data.dataset.kwargs)
    q, g = build_test_loaders(ds, height=128, width=64)
    kw = dict(flip=recipe.eval.flip, normalize=True, progress=False)
    qf, _, _, qpaths = extract_features(model, q, **kw)
    gf, g_pids, _, gpaths = extract_features(model, g, **kw)
    dist = (1 - qf @ gf.T).numpy()
    assert rep["metric"] == "cosine" and rep["flip"] is True and len(rep["queries"]) == 3
    for entry in rep["queries"]:
        i = entry["index"]
        assert qpaths[i] == entry["path"]
        d = [e["distance"] for e in entry["ranked"]]
        assert d == sorted(d) and len(d) == 8
        for e in entry["ranked"]:
            assert gpaths[e["gallery_index"]] == e["path"] and g_pids[e["gallery_index"]] == e["pid"]
            assert e["distance"] == pytest.approx(float(dist[i, e["gallery_index"]]), abs=1e-5)
        # the list is the head of the stable ascending order (CUHK01 has no junk)
        direct = np.argsort(dist[i], kind="stable")[:8].tolist()
        got = [e["gallery_index"] for e in entry["ranked"]]
        assert np.allclose(dist[i, got], dist[i, direct], atol=1e-5)


def test_junk_is_never_listed_on_a_cross_domain_target(run, junk_target):
    files = visualize_ranks(run, target=DatasetRef(name="market1501", root=str(junk_target)), queries=50, topk=20)
    out = run / "ranks" / "market1501"
    assert files[-1] == out / "ranks.json"
    rep = _load(out)
    assert rep["protocol"] == "cross-domain" and rep["num_query"] == 5 and rep["num_gallery"] == 17
    w, h = LAYOUT.row_size(20)
    assert Image.open(out / "ranks.png").size == (w, 5 * h)
    for q in rep["queries"]:
        ranked = q["ranked"]
        assert q["num_junk"] == 2 and len(ranked) == 17 - 2  # same-camera image of the pid and the pid -1 image
        assert all(not (e["pid"] == q["pid"] and e["camid"] == q["camid"]) and e["pid"] != -1 for e in ranked)
        assert sum(e["pid"] == 0 for e in ranked) == 1  # the distractor stays, as a false match
        assert sum(e["match"] for e in ranked) == q["num_positives"] == 2
        img = Image.open(out / q["image"]).convert("RGB")
        for e in ranked:
            assert _border_pixels(img, e["box"]) == {MATCH_COLOR if e["match"] else MISMATCH_COLOR}
        x0 = LAYOUT.box(len(ranked) + 1)[0]  # columns past the list stay blank
        assert img.getpixel((x0 + 1, LAYOUT.margin + 1)) == (255, 255, 255)


def test_query_choice_seed_and_stale_pictures(run):
    out = run / "ranks_choice"
    visualize_ranks(run, query_ids=[7, 2, 7], topk=2, out=out)
    rep = _load(out)
    assert [q["index"] for q in rep["queries"]] == [7, 2] and rep["query_ids"] == [7, 2]
    assert sorted(p.name for p in out.glob("query_*.png")) == ["query_2.png", "query_7.png"]

    visualize_ranks(run, queries=4, topk=1, out=out, seed=1)
    a = [q["index"] for q in _load(out)["queries"]]
    assert sorted(p.name for p in out.glob("query_*.png")) == sorted(f"query_{i}.png" for i in a)  # old ones removed
    visualize_ranks(run, queries=4, topk=1, out=out, seed=1)
    assert [q["index"] for q in _load(out)["queries"]] == a == sorted(a) and len(set(a)) == 4
    visualize_ranks(run, queries=4, topk=1, out=out, seed=2)
    assert [q["index"] for q in _load(out)["queries"]] != a

    visualize_ranks(run, queries=1000, topk=1, out=out)  # more than there are: all of them
    rep = _load(out)
    assert [q["index"] for q in rep["queries"]] == list(range(MAX_IDS)) == list(range(rep["num_query"]))
    assert Image.open(out / "ranks.png").size == (LAYOUT.row_size(1)[0], MAX_IDS * LAYOUT.row_size(1)[1])


def test_bad_arguments_raise_clear_errors(run, tmp_path):
    for kw, name in (({"topk": 0}, "topk"), ({"queries": 0}, "queries"), ({"topk": 2.5}, "topk"),
                     ({"seed": "x"}, "seed"), ({"target": 3}, "target")):
        with pytest.raises(ValueError, match=name):
            visualize_ranks(run, **kw)
    with pytest.raises(VisualizeError, match="query_ids: 999"):
        visualize_ranks(run, query_ids=[999], out=tmp_path / "x")
    with pytest.raises(RunFolderError, match="recipe.yaml"):
        visualize_ranks(tmp_path)
    with pytest.raises(RunFolderError, match="no such folder"):
        visualize_ranks(tmp_path / "missing")
    assert issubclass(VisualizeError, NasreidError) and issubclass(RunFolderError, NasreidError)


def test_draw_ranked_list_without_a_run(cuhk01_dir, tmp_path):
    q = cuhk_png(cuhk01_dir, 1, 1)
    gallery = [cuhk_png(cuhk01_dir, 1, 3), cuhk_png(cuhk01_dir, 2, 3), Image.open(cuhk_png(cuhk01_dir, 3, 4))]
    out = draw_ranked_list(q, gallery, [True, False, None], [0.1, 0.25, 0.5], tmp_path / "sub" / "row.png",
                           pids=[1, 2, 3], columns=5)
    img = Image.open(out).convert("RGB")
    assert out == tmp_path / "sub" / "row.png" and img.size == LAYOUT.row_size(5)
    for col, colour in enumerate((QUERY_COLOR, MATCH_COLOR, MISMATCH_COLOR, UNKNOWN_COLOR)):
        assert _border_pixels(img, LAYOUT.box(col)) == {colour}
    small = RankLayout(tile_height=64, tile_width=32, border=2)
    out2 = draw_ranked_list(q, gallery[:1], [True], None, tmp_path / "r2.png", captions=["mine"], layout=small)
    assert Image.open(out2).size == small.row_size(1)
    with pytest.raises(VisualizeError, match="matches"):
        draw_ranked_list(q, gallery, [True], [0.1, 0.2, 0.3], tmp_path / "bad.png")
    with pytest.raises(VisualizeError, match="columns"):
        draw_ranked_list(q, gallery, [True] * 3, None, tmp_path / "bad.png", columns=2)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        draw_ranked_list(q, [tmp_path / "nope.png"], [False], None, tmp_path / "bad.png")
