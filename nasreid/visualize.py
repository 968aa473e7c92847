"""Ranked-result pictures: for a query, its top-k gallery images as the evaluation ranks them.

The picture re-ID users look at first (as in torchreid's ``visualize_ranked_results``): one row per query,
the query image with a blue border, then its ``topk`` nearest gallery images, each with a **green** border
when it shows the query's identity (same pid) and a **red** one when it does not, captioned with its rank,
distance and pid / camera.

Ranking follows the Market-1501 protocol of :mod:`nasreid.evaluation.metrics` (Zheng et al., ICCV 2015):
gallery images with the query's pid *and* camera, and gallery images with pid ``-1``, are **junk** and are
removed from the list (they are not counted as ranks); distractors (pid ``0``) stay as negatives. Distances
are those of evaluation: features extracted by :func:`nasreid.evaluation.features.extract_features` with the
recipe's ``eval.flip`` and compared with the recipe's ``eval.metric``: ``cosine`` (the default; features
L2-normalised, ``d = 1 - cos`` in ``[0, 2]``) or ``euclidean`` (squared L2 of the raw features, as evaluation
does); ties keep gallery order.

Files written by :func:`visualize_ranks` (default folder ``RUN/ranks/``)::

    query_<idx>.png   one row per chosen query (idx = index into the dataset's query list)
    ranks.png         every row stacked, in the order of ``ranks.json``
    ranks.json        per query: path, pid, camid, and the ranked gallery (rank, gallery index, path, pid, camid,
                      distance, match flag, border box in the row picture), so the picture can be checked

Pictures are drawn with PIL (no display needed). Every image is resized, keeping its aspect ratio, to the
layout's tile height (``RankLayout.tile_height``, 128 px) and centred in a tile of ``tile_width`` (64 px), so
every row of ``k`` gallery columns has the same size: :meth:`RankLayout.row_size`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union, cast

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nasreid.errors import NasreidError, RunFolderError

if TYPE_CHECKING:
    import torch

    from nasreid.data.loaders import ImageDataset

__all__ = ["VisualizeError", "RankLayout", "draw_ranked_list", "render_ranked_list", "visualize_ranks",
           "correspondences", "draw_correspondences", "match_pair",
           "QUERY_COLOR", "MATCH_COLOR", "MISMATCH_COLOR", "UNKNOWN_COLOR"]

log = logging.getLogger("nasreid")

#: border colours (RGB): the query, a true match (same pid), a false match, a gallery image of unknown label
QUERY_COLOR = (31, 119, 180)
MATCH_COLOR = (0, 170, 0)
MISMATCH_COLOR = (220, 0, 0)
UNKNOWN_COLOR = (150, 150, 150)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_SEPARATOR = (200, 200, 200)

ImageLike = Union[str, os.PathLike, Image.Image]


class VisualizeError(NasreidError, ValueError):
    """A bad argument of the ranked-result pictures (``topk < 1``, a query index out of range, lists of
    different lengths ...); the message names the argument. A ``ValueError`` too."""


@dataclass(frozen=True)
class RankLayout:
    """Geometry of one ranked-list row, in pixels.

    A row is ``margin | query box | query_gap | box | gap | box ... | margin`` wide and
    ``margin + box + caption_height + margin`` high; a *box* is a tile (``tile_width`` x ``tile_height``, the
    image fitted inside, aspect ratio kept) surrounded by a ``border``-pixel coloured frame; the caption (at
    most two lines) sits under its box.
    """

    tile_height: int = 128
    tile_width: int = 64
    border: int = 4
    gap: int = 6
    query_gap: int = 20
    margin: int = 8
    caption_height: int = 30
    font_size: int = 11

    def __post_init__(self):
        for k, v in asdict(self).items():
            low = 1 if k in ("tile_height", "tile_width", "font_size") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise VisualizeError(f"RankLayout.{k} must be an integer >= {low}, got {v!r}")

    @property
    def box_width(self) -> int:
        """Width of a bordered tile: ``tile_width + 2 * border``."""
        return self.tile_width + 2 * self.border

    @property
    def box_height(self) -> int:
        """Height of a bordered tile: ``tile_height + 2 * border``."""
        return self.tile_height + 2 * self.border

    def row_size(self, columns: int) -> tuple[int, int]:
        """``(width, height)`` in pixels of a row with ``columns`` gallery tiles (``columns >= 0``)."""
        w = 2 * self.margin + self.box_width
        if columns > 0:
            w += self.query_gap + columns * self.box_width + (columns - 1) * self.gap
        return w, 2 * self.margin + self.box_height + self.caption_height

    def box(self, column: int) -> tuple[int, int, int, int]:
        """Bordered box ``(x0, y0, x1, y1)`` of ``column`` in a row (0 = query, ``r`` = rank ``r``); ``x1`` /
        ``y1`` exclusive. The border is the ``border`` outermost pixels of the box."""
        x0 = self.margin
        if column > 0:
            x0 += self.box_width + self.query_gap + (column - 1) * (self.box_width + self.gap)
        return x0, self.margin, x0 + self.box_width, self.margin + self.box_height


_FONTS: dict[int, Any] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
        except (TypeError, AttributeError, OSError):
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _open(img: ImageLike, what: str) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    p = os.fspath(img)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{what}: image file not found: {p}")
    with Image.open(p) as im:
        return im.convert("RGB")


def _fit(img: Image.Image, layout: RankLayout) -> Image.Image:
    """Resize to the tile height keeping the aspect ratio (to the tile width if that is wider)."""
    w, h = img.size
    s = min(layout.tile_height / h, layout.tile_width / w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img.resize(size, Image.Resampling.BILINEAR) if size != img.size else img


def _draw_tile(canvas: Image.Image, draw: ImageDraw.ImageDraw, layout: RankLayout, column: int,
               img: Image.Image, colour, caption: str) -> None:
    x0, y0, x1, y1 = layout.box(column)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    b = layout.border
    draw.rectangle((x0 + b, y0 + b, x1 - 1 - b, y1 - 1 - b), fill=_BACKGROUND)
    tile = _fit(img, layout)
    canvas.paste(tile, (x0 + b + (layout.tile_width - tile.size[0]) // 2,
                        y0 + b + (layout.tile_height - tile.size[1]) // 2))
    font = _font(layout.font_size)
    line_h = layout.font_size + 3
    for i, line in enumerate(caption.split("\n")[:max(1, layout.caption_height // line_h)]):
        tw = draw.textlength(line, font=font)
        draw.text((x0 + (layout.box_width - tw) / 2, y1 + 2 + i * line_h), line, fill=_TEXT, font=font)


def _fmt_dist(d: float) -> str:
    """Three decimals; tiny (< 0.01, e.g. an untrained network) or large distances in scientific notation."""
    if not np.isfinite(d) or abs(d) >= 100 or (d != 0 and abs(d) < 0.01):
        return f"{d:.2g}" if np.isfinite(d) else str(d)
    return f"{d:.3f}"


def _colour(m) -> tuple[int, int, int]:
    if m is None:
        return UNKNOWN_COLOR
    return MATCH_COLOR if bool(m) else MISMATCH_COLOR


def render_ranked_list(query: ImageLike, gallery: Sequence[ImageLike], matches: Sequence[Optional[bool]],
                       distances: Optional[Sequence[float]] = None, captions: Optional[Sequence[str]] = None, *,
                       query_caption: str = "query", pids: Optional[Sequence[int]] = None,
                       columns: Optional[int] = None, layout: Optional[RankLayout] = None) -> Image.Image:
    """The row picture of :func:`draw_ranked_list` as an RGB ``PIL.Image`` of size
    ``layout.row_size(columns)`` (not written anywhere). Arguments and errors as :func:`draw_ranked_list`."""
    layout = layout or RankLayout()
    k = len(gallery)
    if len(matches) != k:
        raise VisualizeError(f"matches has {len(matches)} entries but gallery_paths has {k}")
    if distances is not None and len(distances) != k:
        raise VisualizeError(f"distances has {len(distances)} entries but gallery_paths has {k}")
    if captions is not None and len(captions) != k:
        raise VisualizeError(f"captions has {len(captions)} entries but gallery_paths has {k}")
    if pids is not None and len(pids) != k:
        raise VisualizeError(f"pids has {len(pids)} entries but gallery_paths has {k}")
    columns = k if columns is None else columns
    if not isinstance(columns, (int, np.integer)) or columns < k:
        raise VisualizeError(f"columns must be an integer >= the number of gallery images ({k}), got {columns!r}")
    if captions is None:
        captions = []
        for r in range(k):
            line1 = f"#{r + 1}" + (f" d={_fmt_dist(float(distances[r]))}" if distances is not None else "")
            captions.append(line1 + (f"\npid {pids[r]}" if pids is not None else ""))
    canvas = Image.new("RGB", layout.row_size(int(columns)), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_tile(canvas, draw, layout, 0, _open(query, "query_path"), QUERY_COLOR, query_caption)
    if columns > 0:  # a thin separator between the query and its ranked list
        x = layout.box(0)[2] + layout.query_gap // 2
        draw.line((x, layout.margin, x, layout.margin + layout.box_height - 1), fill=_SEPARATOR, width=1)
    for r in range(k):
        _draw_tile(canvas, draw, layout, r + 1, _open(gallery[r], f"gallery_paths[{r}]"), _colour(matches[r]),
                   captions[r])
    return canvas


def draw_ranked_list(query_path: ImageLike, gallery_paths: Sequence[ImageLike], matches: Sequence[Optional[bool]],
                     distances: Optional[Sequence[float]], out_path: str | os.PathLike,
                     captions: Optional[Sequence[str]] = None, *, query_caption: str = "query",
                     pids: Optional[Sequence[int]] = None, columns: Optional[int] = None,
                     layout: Optional[RankLayout] = None) -> Path:
    """Draw one ranked list -- the query, then its gallery images in rank order -- and write it as a PNG.

    Usable without a run: give image files (or ``PIL.Image`` s) and the match flags yourself.

    Args:
        query_path: the query image (file path or ``PIL.Image``); drawn first with a blue border
            (:data:`QUERY_COLOR`).
        gallery_paths: the ``k`` ranked gallery images, best first.
        matches: ``k`` flags: ``True`` = same identity as the query (green border, :data:`MATCH_COLOR`),
            ``False`` = another identity (red, :data:`MISMATCH_COLOR`), ``None`` = unknown (grey).
        distances: ``k`` distances (unitless, smaller = more alike) shown in the default captions, or ``None``.
        out_path: the PNG to write (parent folders are created).
        captions: ``k`` captions (at most two lines, ``"\\n"``-separated) replacing the default
            ``"#<rank> d=<distance>\\npid <pid>"``.
        query_caption: caption under the query (two lines at most).
        pids: ``k`` gallery identities for the default captions.
        columns: gallery columns of the picture (``>= k``; empty slots stay white), so that rows with
            fewer than ``k`` images line up with the others. Default ``k``.
        layout: tile sizes and spacing (:class:`RankLayout`); the picture is ``layout.row_size(columns)``
            pixels (width, height), and the box of rank ``r`` is ``layout.box(r)``.

    Returns:
        ``Path(out_path)``.

    Raises:
        VisualizeError (a ``ValueError``): lists of different lengths or ``columns < k`` (names the argument).
        FileNotFoundError: an image file does not exist (names it). PIL's errors for unreadable images.
    """
    img = render_ranked_list(query_path, gallery_paths, matches, distances, captions, query_caption=query_caption,
                             pids=pids, columns=columns, layout=layout)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


# ---------------------------------------------------------------------------------------------------
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VisualizeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _choose_queries(num_query: int, queries: int, seed: int, query_ids) -> list[int]:
    if query_ids is not None:
        if isinstance(query_ids, (int, np.integer)) and not isinstance(query_ids, bool):
            query_ids = [query_ids]
        ids: list[int] = []
        for q in query_ids:
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q < num_query:
                raise VisualizeError(f"query_ids: {q!r} is not a query index in 0..{num_query - 1}")
            if int(q) not in ids:
                ids.append(int(q))
        if not ids:
            raise VisualizeError("query_ids is empty")
        return ids
    if queries >= num_query:
        return list(range(num_query))
    rng = np.random.RandomState(seed)
    return sorted(int(i) for i in rng.choice(num_query, size=queries, replace=False))


def _target_ref(target):
    from nasreid.config import DatasetRef

    if target is None or isinstance(target, DatasetRef):
        return target
    if isinstance(target, dict):
        return DatasetRef(**target)
    if isinstance(target, str):
        return DatasetRef(name=target)
    raise VisualizeError(f"target must be a DatasetRef (or a dataset name / dict), got {type(target).__name__}")


def _clean_stale(out: Path, keep: set[str]) -> None:
    """Remove the query pictures a previous call listed in ``out/ranks.json`` that this call does not write."""
    from nasreid.engine.checkpoint import read_json

    try:
        old = read_json(out / "ranks.json", {}) or {}
    except ValueError:
        return
    for q in old.get("queries", []) if isinstance(old, dict) else []:
        name = str(q.get("image", "")) if isinstance(q, dict) else ""
        if re.fullmatch(r"query_\d+\.png", name) and name not in keep and (out / name).is_file():
            (out / name).unlink()


def visualize_ranks(run_dir: str | os.PathLike, *, queries: int = 10, topk: int = 10,
                    out: Optional[str | os.PathLike] = None, target=None, seed: int = 0,
                    device: Optional[str] = None, query_ids: Optional[Sequence[int]] = None,
                    layout: Optional[RankLayout] = None) -> list[Path]:
    """Ranked-result pictures of a retrain run's network: each chosen query with its ``topk`` gallery matches.

    Loads the run's network (:func:`nasreid.engine.runs.load_run_model`: ``model.pt``, or
    ``checkpoints/last.pt`` of an interrupted run), builds the run's dataset (``recipe.data.dataset``) or the
    cross-domain ``target``, extracts features of the chosen queries and of the whole gallery as evaluation
    does (input ``recipe.data.height x width``, ``eval.flip``, L2-normalised for ``eval.metric`` cosine), ranks the
    gallery for each query with junk removed (same pid and same camera, or pid ``-1``; see the module
    docstring) and draws one row per query (:func:`draw_ranked_list`). A recipe's ``eval.matcher`` /
    ``eval.postprocessors`` are not applied: the pictures show plain feature distances (a warning says so).

    Args:
        run_dir: a retrain run folder (``recipe.yaml``, ``genotype.json``, ``model.pt``).
        queries: number of queries drawn, chosen at random with ``seed`` (sorted by index); all queries when
            it is at least their number. Ignored when ``query_ids`` is given.
        topk: gallery images per query (fewer when the junk-free gallery is smaller; the row keeps ``topk``
            columns so that all rows line up).
        out: output folder; default ``RUN/ranks`` (``RUN/ranks/<target name>`` with a ``target``).
        target: a :class:`nasreid.config.DatasetRef` (or its name, or a dict) of a dataset to rank on instead
            of the run's own test split; built with ``eval_only=True`` (only query and gallery are read).
        seed: seed of the query choice (same seed, same queries).
        device: ``"cpu"``, ``"cuda"``, ...; default the recipe's device, or CPU when that is CUDA and none is
            available.
        query_ids: explicit query indices (into the dataset's query list), drawn in this order.
        layout: tile sizes and spacing (:class:`RankLayout`).

    Returns:
        The written files: ``query_<idx>.png`` per query (in order), then ``ranks.png`` (all rows stacked:
        ``(row width, n_queries * row height)`` pixels) and ``ranks.json``. ``ranks.json`` holds ``queries``:
        for each, ``index``, ``path``, ``pid``, ``camid``, ``image``, ``offset`` (its row's top-left corner in
        ``ranks.png``), ``num_junk``, ``num_positives``, ``first_match_rank`` (1-based rank of the first true
        match in the whole junk-free ranking, ``null`` if none), ``ap`` (average precision, fraction; ``null``
        without positives) and ``ranked``: per rank ``rank``, ``gallery_index``, ``path``, ``pid``, ``camid``,
        ``distance``, ``match`` (same pid) and ``box`` (``[x0, y0, x1, y1]`` of the bordered tile in the row
        picture, exclusive end).

    Raises:
        VisualizeError (a ``ValueError``): ``queries`` / ``topk`` not a positive integer, ``query_ids`` out of
            range or empty, a bad ``target``, an empty query or gallery split.
        RunFolderError: ``run_dir`` is not a (retrain) run folder. CheckpointError / GenotypeError: its weights
            or genotype cannot be read or do not fit. RecipeError / DatasetLayoutError / RegistryError: the
            dataset cannot be built; RecipeError: ``device`` is CUDA and none is available.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from nasreid.config import loader_workers, resolve_data_root
    from nasreid.data import build_dataset, build_test_loaders
    from nasreid.engine.checkpoint import write_json
    from nasreid.engine.runs import load_run_model
    from nasreid.engine.trainer import device_context
    from nasreid.evaluation import compute_distance, extract_features

    queries = _positive_int(queries, "queries")
    topk = _positive_int(topk, "topk")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise VisualizeError(f"seed must be an integer, got {seed!r}")
    target = _target_ref(target)
    layout = layout or RankLayout()
    run = Path(run_dir)
    if not run.is_dir():
        raise RunFolderError(f"{run} is not a nasreid run folder: no such folder")

    model, recipe, _ = load_run_model(run, device=device)
    dev = recipe.device
    if device is None and dev.startswith("cuda") and not torch.cuda.is_available():
        dev = "cpu"
    ctx = device_context(dev, recipe.amp, recipe.channels_last)
    model = ctx.model(model)
    d, e = recipe.data, recipe.eval
    if e.matcher is not None or e.postprocessors:
        log.warning("visualize_ranks ranks by plain feature distance (%s); the recipe's eval.matcher / "
                    "eval.postprocessors are not applied to the pictures", e.metric)
    if target is None:
        ref, protocol = d.dataset, "same-domain"
        ds = build_dataset(ref.name, resolve_data_root(ref.root), **ref.kwargs)
    else:
        ref, protocol = target, "cross-domain"
        ds = build_dataset(ref.name, resolve_data_root(ref.root), eval_only=True, **ref.kwargs)
    if not ds.query or not ds.gallery:
        raise VisualizeError(f"dataset {ds.name!r} has an empty query or gallery split")
    out_dir = Path(out) if out is not None else (run / "ranks" if target is None else run / "ranks" / ref.name)

    q_loader, g_loader = build_test_loaders(ds, height=d.height, width=d.width, batch_size=e.batch_size,
                                            workers=loader_workers(recipe), on_corrupt=d.on_corrupt)
    # build_test_loaders' datasets are ImageDatasets (their records: the images that load, see on_corrupt)
    q_records = cast("ImageDataset", q_loader.dataset).records
    g_records = cast("ImageDataset", g_loader.dataset).records
    chosen = _choose_queries(len(q_records), queries, int(seed), query_ids)
    sub = DataLoader(Subset(q_loader.dataset, chosen), batch_size=e.batch_size, shuffle=False,
                     num_workers=loader_workers(recipe))
    normalize = e.metric == "cosine"  # as evaluation: cosine compares unit vectors, euclidean the raw features
    kw: dict[str, Any] = dict(device=ctx.device, flip=e.flip, amp=ctx.amp, normalize=normalize,
                              channels_last=ctx.channels_last, progress=False)
    qf, q_pids, q_camids, _ = extract_features(model, sub, desc="query", **kw)
    gf, g_pids, g_camids, _ = extract_features(model, g_loader, desc="gallery", **kw)
    dist = compute_distance(qf, gf, e.metric).cpu().numpy()

    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir, {f"query_{i}.png" for i in chosen})
    row_w, row_h = layout.row_size(topk)
    overview = Image.new("RGB", (row_w, row_h * len(chosen)), _BACKGROUND)
    files: list[Path] = []
    entries = []
    for n, qi in enumerate(chosen):
        qrec = q_records[qi]
        q_pid, q_cam = int(q_pids[n]), int(q_camids[n])
        junk = ((g_pids == q_pid) & (g_camids == q_cam)) | (g_pids == -1)
        order = np.argsort(dist[n], kind="stable")
        order = order[~junk[order]]
        same = g_pids[order] == q_pid
        pos_ranks = np.flatnonzero(same)
        ap = float(np.mean((np.arange(len(pos_ranks)) + 1) / (pos_ranks + 1))) if len(pos_ranks) else None
        top = order[:topk]
        matches = [bool(g_pids[j] == q_pid) for j in top]
        captions = [f"#{r + 1} d={_fmt_dist(float(dist[n, j]))}\npid {int(g_pids[j])} c{int(g_camids[j])}"
                    for r, j in enumerate(top)]
        img = render_ranked_list(ds.read_image(qrec), [ds.read_image(g_records[j]) for j in top], matches,
                                 captions=captions, query_caption=f"query c{q_cam}\npid {q_pid}", columns=topk,
                                 layout=layout)
        name = f"query_{qi}.png"
        img.save(out_dir / name, format="PNG")
        overview.paste(img, (0, n * row_h))
        if n:
            ImageDraw.Draw(overview).line((0, n * row_h, row_w - 1, n * row_h), fill=_SEPARATOR)
        files.append(out_dir / name)
        entries.append({
            "index": qi, "path": qrec.path, "pid": q_pid, "camid": q_cam, "image": name, "offset": [0, n * row_h],
            "num_junk": int(junk.sum()), "num_positives": int(len(pos_ranks)),
            "first_match_rank": int(pos_ranks[0]) + 1 if len(pos_ranks) else None, "ap": ap,
            "ranked": [{"rank": r + 1, "gallery_index": int(j), "path": g_records[j].path, "pid": int(g_pids[j]),
                        "camid": int(g_camids[j]), "distance": float(dist[n, j]), "match": matches[r],
                        "box": list(layout.box(r + 1))} for r, j in enumerate(top)],
        })
    overview.save(out_dir / "ranks.png", format="PNG")
    files.append(out_dir / "ranks.png")
    write_json(out_dir / "ranks.json", {
        "run": str(run), "dataset": ds.name, "dataset_kwargs": dict(ref.kwargs), "protocol": protocol,
        "metric": e.metric, "flip": e.flip, "normalized": normalize, "input_size": [d.height, d.width], "topk": topk,
        "seed": int(seed), "query_ids": list(chosen) if query_ids is not None else None,
        "num_query": len(q_records), "num_gallery": len(g_records), "device": str(ctx.device),
        "layout": {**asdict(layout), "row_size": [row_w, row_h]},
        "colors": {"query": QUERY_COLOR, "match": MATCH_COLOR, "mismatch": MISMATCH_COLOR},
        "queries": entries,
    })
    files.append(out_dir / "ranks.json")
    return files


# ---------------------------------------------------------------------------------------------------
def correspondences(qmap: "torch.Tensor", gmap: "torch.Tensor", top: int = 12) -> list[dict[str, Any]]:
    """The strongest local correspondences between two QAConv feature maps (Liao & Shao, ECCV 2020, Sec. 3.1
    and Fig. 2): for every query location its best-matching gallery location (the max that QAConv's global max
    pooling keeps, kernel s = 1: cosine similarity of the L2-normalised channel vectors), the ``top`` strongest
    kept, strongest first.

    Args:
        qmap, gmap: ``[d, h, w]`` L2-normalised maps of one query and one gallery image (``head.extract``).
        top: number of correspondences to keep (>= 1).

    Returns:
        ``[{"query": (row, col), "gallery": (row, col), "similarity": float}, ...]`` in map coordinates.

    Raises:
        VisualizeError: maps of different shapes or not 3-D, ``top < 1``.
    """
    import torch

    top = _positive_int(top, "top")
    if qmap.dim() != 3 or qmap.shape != gmap.shape:
        raise VisualizeError(f"qmap and gmap must be [d, h, w] of one shape, got {tuple(qmap.shape)} and "
                             f"{tuple(gmap.shape)}")
    _, h, w = qmap.shape
    sim = torch.einsum("dq,dg->qg", qmap.reshape(qmap.shape[0], -1).float(), gmap.reshape(gmap.shape[0], -1).float())
    best, where = sim.max(dim=1)  # [hw]: best gallery location of every query location
    order = best.argsort(descending=True)[:top]
    return [{"query": (int(i) // w, int(i) % w), "gallery": (int(where[i]) // w, int(where[i]) % w),
             "similarity": float(best[i])} for i in order]


def draw_correspondences(query: ImageLike, gallery: ImageLike, pairs: Sequence[dict[str, Any]],
                         map_size: tuple[int, int], out_path: str | os.PathLike, *, height: int = 256,
                         caption: Optional[str] = None) -> Path:
    """Draw ``pairs`` (from :func:`correspondences`) as lines between the two images side by side, the centres
    of the matched feature-map cells joined, colour from red (weakest kept) to green (strongest), as in the
    QAConv paper's Fig. 2. Both images are resized to ``height`` px (aspect kept).

    Args:
        query, gallery: image paths or PIL images. map_size: ``(h, w)`` of the feature maps.
        out_path: PNG to write. caption: text under the images (e.g. the QAConv score).

    Returns:
        The written path.

    Raises:
        VisualizeError: empty ``pairs`` or a bad ``map_size``.
    """
    if not pairs:
        raise VisualizeError("pairs is empty: nothing to draw")
    mh, mw = (int(v) for v in map_size)
    if mh < 1 or mw < 1:
        raise VisualizeError(f"map_size must be positive, got {map_size}")
    imgs = []
    for img, what in ((query, "query"), (gallery, "gallery")):
        im = _open(img, what).convert("RGB")
        imgs.append(im.resize((max(1, round(im.width * height / im.height)), height)))
    gap, margin, cap_h = 40, 10, 24 if caption else 0
    width = imgs[0].width + gap + imgs[1].width + 2 * margin
    canvas = Image.new("RGB", (width, height + 2 * margin + cap_h), _BACKGROUND)
    x0, x1 = margin, margin + imgs[0].width + gap
    canvas.paste(imgs[0], (x0, margin))
    canvas.paste(imgs[1], (x1, margin))
    draw = ImageDraw.Draw(canvas)
    sims = [p["similarity"] for p in pairs]
    lo, hi = min(sims), max(sims)

    def centre(rc, x_off, im):
        r, c = rc
        return x_off + (c + 0.5) * im.width / mw, margin + (r + 0.5) * im.height / mh

    for p in sorted(pairs, key=lambda p: p["similarity"]):  # strongest drawn last, on top
        t = 0.0 if hi == lo else (p["similarity"] - lo) / (hi - lo)
        colour = (int(220 * (1 - t)), int(170 * t + 30 * (1 - t)), 0)
        a, b = centre(p["query"], x0, imgs[0]), centre(p["gallery"], x1, imgs[1])
        draw.line([a, b], fill=colour, width=2)
        for x, y in (a, b):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    if caption:
        draw.text((margin, height + 2 * margin), caption, fill=_TEXT, font=_font(12))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def match_pair(run_dir: str | os.PathLike, query: int, gallery: int, *, out: Optional[str | os.PathLike] = None,
               top: int = 12, target=None, device: Optional[str] = None) -> dict[str, Any]:
    """``nasreid match``: the QAConv score of query ``query`` against gallery image ``gallery`` (indices into
    the run's test split, or ``target``'s) and a picture of their strongest local correspondences.

    Needs a run trained with ``training.method: qaconv`` (its network carries the QAConv head).

    Returns:
        ``{"query": path, "gallery": path, "query_pid", "gallery_pid", "score": sigmoid QAConv similarity,
        "correspondences": [...], "picture": PNG path}``; the PNG defaults to
        ``RUN/match/q<query>_g<gallery>.png``.

    Raises:
        VisualizeError: an index out of range or a run whose network has no QAConv head.
        RunFolderError: not a run folder.
    """
    import torch

    from nasreid.config import resolve_data_root
    from nasreid.data import build_dataset, build_transforms
    from nasreid.engine.runs import load_run_model

    model, recipe, _ = load_run_model(run_dir, device=device)
    head = getattr(model, "qaconv", None)
    if head is None:
        raise VisualizeError(f"{run_dir}: the network has no QAConv head; train it with training.method: qaconv")
    ref = _target_ref(target) if target is not None else recipe.data.dataset
    kw = {"eval_only": True} if target is not None else {}
    ds = build_dataset(ref.name, resolve_data_root(ref.root), **kw, **ref.kwargs)
    for idx, split, name in ((query, ds.query, "query"), (gallery, ds.gallery, "gallery")):
        if not 0 <= int(idx) < len(split):
            raise VisualizeError(f"{name}: {idx} is not an index of the {len(split)} {name} images")
    q, g = ds.query[int(query)], ds.gallery[int(gallery)]
    tf = build_transforms(recipe.data.height, recipe.data.width, is_train=False)
    dev = torch.device(device or ("cpu" if not recipe.device.startswith("cuda") or not torch.cuda.is_available()
                                  else recipe.device))
    model = model.to(dev).eval()
    with torch.no_grad():
        x = torch.stack([tf(ds.read_image(q)), tf(ds.read_image(g))]).to(dev)
        maps = head.extract(model, x)
        score = float(head.similarity(maps[:1], maps[1:2]).reshape(-1)[0])
    pairs = correspondences(maps[0].cpu(), maps[1].cpu(), top=top)
    out = Path(out) if out is not None else Path(run_dir) / "match" / f"q{int(query)}_g{int(gallery)}.png"
    caption = (f"query {int(query)} (pid {q.pid}, cam {q.camid})  vs  gallery {int(gallery)} (pid {g.pid}, "
               f"cam {g.camid}): QAConv score {score:.3f}")
    draw_correspondences(ds.read_image(q), ds.read_image(g), pairs, tuple(maps.shape[2:]), out, caption=caption)
    return {"query": q.path, "gallery": g.path, "query_pid": q.pid, "gallery_pid": g.pid, "score": score,
            "correspondences": pairs, "picture": str(out)}
