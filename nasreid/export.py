"""Export the network of a retrain run to ONNX, and check that the exported model ranks like PyTorch.

``nasreid export RUN --format onnx`` (:func:`run_export`) writes ``RUN/export/model.onnx`` and
``RUN/export/parity.json``.

The exported model
------------------
One input and one output, both ``float32``:

* ``images``: ``[B, 3, H, W]``, NCHW, RGB, ``B`` dynamic (any batch size >= 1), ``H × W`` fixed to the run's
  input size (``recipe.data.height × recipe.data.width``). Pixels are *preprocessed exactly as in evaluation*:
  the 8-bit RGB image resized to ``H × W`` (bilinear with antialiasing, torchvision ``v2.Resize(antialias=True)``
  on the ``uint8`` image tensor, rounded to 8 bits), divided by 255 (values in ``[0, 1]``), then normalised per
  channel, ``(x - mean) / std`` (ImageNet statistics unless the recipe says otherwise).
  :class:`nasreid.extractor.FeatureExtractor` does exactly this.
* ``features``: ``[B, D]``, the network's eval-mode embedding (for a BNNeck head, the feature after the
  BN), **not** L2-normalised. Re-ID matching in nasreid uses the cosine distance (or the recipe's
  ``eval.metric``): L2-normalise each row yourself (``f / ||f||_2``) before taking dot products. When the
  recipe evaluates with ``eval.flip``, nasreid averages the features of the image and of its horizontal
  mirror (before normalising); the ONNX model does not: run it on both and average, if you want the same.

The graph is exported in eval mode: BatchNorm uses its running statistics; InstanceNorm (OSNet-AIN's IN
layers, which have no running statistics) normalises each image with its own statistics, as in PyTorch.
No classifier is in the graph. Weights are stored inside the one ``.onnx`` file (no external data file).

Metadata (``ModelProto.metadata_props``, all values strings; read them with
``{p.key: p.value for p in onnx.load(path).metadata_props}`` or onnxruntime's
``session.get_modelmeta().custom_metadata_map``):

==============================  ===========================================================================
key                             value
==============================  ===========================================================================
``nasreid.version``             nasreid version that exported the model, e.g. ``"0.1.0"``
``nasreid.space``               search space of the network, e.g. ``"osnet_ain"``
``nasreid.genotype``            the run's ``genotype.json`` as compact JSON (space, choices, space_kwargs ...)
``nasreid.run_name``            the recipe's ``name``
``input.name``                  ``"images"``
``input.layout``                ``"NCHW"``
``input.height``                ``H`` in pixels, e.g. ``"256"``
``input.width``                 ``W`` in pixels, e.g. ``"128"``
``input.channel_order``         ``"RGB"``
``input.dtype``                 ``"float32"``
``input.pixel_divisor``         ``"255"``: 8-bit pixel values are divided by it first
``input.mean``                  JSON list of 3 floats (RGB, in ``[0, 1]`` units), subtracted after the division
``input.std``                   JSON list of 3 floats, divided by after the mean is subtracted
``input.resize``                ``"bilinear, antialias, uint8"`` (how nasreid resizes to ``H × W``)
``output.name``                 ``"features"``
``output.feature_dim``          ``D``, e.g. ``"512"``
``output.l2_normalized``        ``"false"``: L2-normalise the features yourself for cosine similarity
``output.eval_metric``          the recipe's ``eval.metric`` (``"cosine"`` or ``"euclidean"``)
``output.eval_flip``            ``"true"`` when the recipe averages the features of the mirrored image
==============================  ===========================================================================

Parity (:func:`check_parity`)
-----------------------------
On real images of the run's dataset (the first ``num_query`` query and first ``num_gallery`` gallery images
of its test split, in record order, preprocessed by the evaluation transforms), the PyTorch model and
onnxruntime (``CPUExecutionProvider``) compute features. The ONNX model is run at two or more batch sizes
(the dynamic axis). The check passes when

* ``max_abs_diff`` -- the largest ``|f_torch - f_onnx|`` over every image, feature dimension and batch
  size (in feature units, before any normalisation) -- is at most ``atol`` (default ``1e-4``), and
* for every query, the ``topk`` gallery images ranked by cosine distance (``1 - cos``; stable sort, so ties
  keep gallery order) are the same images in the same order with the PyTorch and with every ONNX feature set.

Example::

    >>> from nasreid.export import run_export
    >>> summary = run_export("results/osnet_ain_cpu_retrain-20250101-120000")   # doctest: +SKIP
    >>> summary["parity"]["passed"], summary["parity"]["max_abs_diff"]            # doctest: +SKIP
    (True, 2.4e-07)

Exporter: the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, which needs
``onnxscript``) by default; the legacy TorchScript exporter (``exporter="torchscript"``) is kept as an
option while torch ships it. Needs the optional dependencies ``pip install "nasreid[onnx]"``
(``onnx``, ``onnxruntime``, ``onnxscript``).
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasreid.errors import NasreidError

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ExportError",
    "check_parity",
    "default_opset",
    "export_onnx",
    "read_metadata",
    "run_export",
]

#: Export formats of :func:`run_export`.
FORMATS = ("onnx",)
#: ``torch.onnx`` exporters: ``"dynamo"`` (``torch.export`` + onnxscript) and the legacy ``"torchscript"``.
EXPORTERS = ("dynamo", "torchscript")
_INSTALL = 'pip install "nasreid[onnx]"  (onnx, onnxruntime, onnxscript)'


class ExportError(NasreidError, RuntimeError):
    """A model cannot be exported: missing optional dependencies (the message says what to install), an
    unknown format / exporter / opset, or an operation of the network the ONNX exporter cannot translate
    (the message names the run folder and the operation)."""


# ---------------------------------------------------------------------------------------------------------
# dependencies and opsets
# ---------------------------------------------------------------------------------------------------------
def _require(*modules: str):
    """Import the named optional modules; :class:`ExportError` with the install hint if one is missing."""
    import importlib

    out = []
    for name in modules:
        try:
            out.append(importlib.import_module(name))
        except ImportError as e:
            raise ExportError(f"ONNX export needs the optional package {name!r} ({e}); install it with "
                              f"{_INSTALL}") from None
    return out[0] if len(out) == 1 else tuple(out)


def _torch_max_opset(exporter: str) -> int:
    try:
        from torch.onnx import _constants as c
    except ImportError:  # pragma: no cover - very old or very new torch
        return 17
    if exporter == "torchscript":
        return int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(c, "ONNX_MAX_OPSET", 17)))
    return int(getattr(c, "ONNX_MAX_OPSET", 18))


def default_opset(exporter: str = "dynamo") -> int:
    """The default ONNX opset: the highest one both the installed ``onnx`` package and torch's exporter support,
    ``min(onnx.defs.onnx_opset_version(), <torch exporter max>)``.

    With onnx 1.23 (opset 28) and torch 2.14 this is 23 for the ``"dynamo"`` exporter (torch's
    ``ONNX_MAX_OPSET``) and 20 for ``"torchscript"`` (``ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``).

    Raises:
        ExportError: ``onnx`` is not installed, or an unknown exporter.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; known: {list(EXPORTERS)}")
    onnx = _require("onnx")
    return int(min(onnx.defs.onnx_opset_version(), _torch_max_opset(exporter)))


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a ``{key: value}`` dict of strings (keys: module docstring).

    Raises:
        ExportError: ``onnx`` is not installed, or the file is missing.
    """
    onnx = _require("onnx")
    p = Path(onnx_path)
    if not p.is_file():
        raise ExportError(f"ONNX file not found: {p}")
    return {prop.key: prop.value for prop in onnx.load(str(p), load_external_data=False).metadata_props}


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------
def _norm_stats(recipe) -> tuple[list[float], list[float]]:
    """Mean/std of the run's test transforms (see :func:`nasreid.extractor._recipe_norm`)."""
    from nasreid.extractor import _recipe_norm

    mean, std = _recipe_norm(recipe)
    return list(mean), list(std)


def _short_reason(exc: BaseException) -> str:
    """One line that says why the exporter failed (its messages run to pages)."""
    text = str(exc)
    for pat in (r"No ONNX function found for <OpOverload\(op='([^']+)'", r"Unsupported: ONNX export of operator (\S+)",
                r"Exporting the operator '([^']+)'"):
        m = re.search(pat, text)
        if m:
            return f"the operation {m.group(1)} has no ONNX translation"
    m = re.search(r"Could not guard on data-dependent expression (.+?)(?: \(unhinted|\.\s|\n|$)", text)
    if m:
        where = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
        loc = f"{where[-1][2]} ({Path(where[-1][0]).name}:{where[-1][1]})" if where else "the network"
        return (f"{loc} branches in Python on tensor values ({m.group(1).strip()}), which torch.export cannot "
                "trace into a graph")
    cause = exc.__cause__
    while cause is not None and str(cause).strip() == "":
        cause = cause.__cause__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    if cause is not None and len(first) < 40:
        first += f": {str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}"
    return f"{type(exc).__name__}: {first[:300]}"


def _export_graph(model: torch.nn.Module, example: torch.Tensor, tmp: Path, opset: int, exporter: str):
    """``torch.onnx.export`` of ``model`` with a dynamic batch axis named ``batch``; returns the ``ModelProto``.

    ``"dynamo"``: one ``torch.export.export(strict=False)`` (not ``torch.onnx.export``'s chain of fallback
    strategies, which only repeat a failure at several times the cost), then its ONNX translation. ``"torchscript"``
    traces into ``tmp`` and reads it back."""
    import contextlib
    import inspect
    import io

    onnx = _require("onnx")
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["features"], "opset_version": opset}
    has_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if exporter == "dynamo" and not has_dynamo:
        raise ExportError(f"torch {torch.__version__} has no torch.export-based ONNX exporter "
                          "(torch.onnx.export(dynamo=True) needs torch >= 2.5); upgrade torch or pass "
                          "exporter='torchscript'")
    if exporter == "dynamo":
        _require("onnxscript")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecation / tracer / instance_norm-mode chatter; parity is checked
        if exporter == "dynamo":
            ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                     strict=False)
            prog = torch.onnx.export(ep, (example,), dynamo=True, verbose=False, **kwargs)
            assert prog is not None  # dynamo=True returns the ONNXProgram
            shape = prog.model.graph.inputs[0].shape
            assert shape is not None  # the exported input's shape (dimension 0 symbolic)
            batch = shape[0]
            if hasattr(prog, "rename_axes") and not isinstance(batch, int):
                prog.rename_axes({batch: "batch"})
            return prog.model_proto
        if has_dynamo:
            kwargs["dynamo"] = False
        torch.onnx.export(model, (example,), str(tmp), do_constant_folding=True,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, **kwargs)
    return onnx.load(str(tmp))


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, opset: int | None = None,
                height: int | None = None, width: int | None = None, *, exporter: str = "dynamo") -> Path:
    """Export the trained network of a retrain run folder to ONNX (see the module docstring for the model's
    input, output and metadata).

    Args:
        run_dir: a retrain run folder (``recipe.yaml``, ``genotype.json``, ``model.pt`` or
            ``checkpoints/last.pt``), loaded with :func:`nasreid.engine.runs.load_run_model`.
        out: the ``.onnx`` file to write (parent folders are created); default ``RUN/export/model.onnx``.
            Written atomically (temporary file + rename).
        opset: ONNX opset; default :func:`default_opset` (``min(onnx.defs.onnx_opset_version(), <torch exporter
            max>)``: 23 with onnx 1.23 + torch 2.14 and the default exporter).
        height, width: input size in pixels baked into the graph; default the recipe's ``data.height`` /
            ``data.width`` (what the network was trained and evaluated on).
        exporter: ``"dynamo"`` (default; ``torch.onnx.export(dynamo=True)``, needs onnxscript) or
            ``"torchscript"`` (the legacy tracer, while torch ships it).

    Returns:
        The path of the written ``.onnx`` file (``images [B, 3, H, W] float32`` -> ``features [B, D] float32``,
        dynamic ``B``), validated with ``onnx.checker.check_model``.

    Raises:
        ExportError: onnx / onnxscript missing (the message says ``pip install "nasreid[onnx]"``), an unknown
            exporter, an opset outside ``[7, default_opset()]``, a network whose eval output is not ``[B, D]``,
            or an operation the exporter cannot translate (names the run folder and the operation).
        RunFolderError / GenotypeError / CheckpointError: ``run_dir`` is not a retrain run folder, or its
            weights are missing or do not fit (from :func:`~nasreid.engine.runs.load_run_model`).
    """
    from nasreid import __version__
    from nasreid.engine.runs import load_run_model

    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; known: {list(EXPORTERS)}")
    onnx = _require("onnx")
    max_opset = default_opset(exporter)
    if opset is None:
        opset = max_opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= max_opset:
        raise ExportError(f"opset must be an integer in [7, {max_opset}] (the highest both onnx "
                          f"{onnx.__version__} and torch {torch.__version__}'s {exporter} exporter support), "
                          f"got {opset!r}")
    run = Path(run_dir)
    model, recipe, geno = load_run_model(run)
    h = int(height or recipe.data.height)
    w = int(width or recipe.data.width)
    if h <= 0 or w <= 0:
        raise ExportError(f"height and width must be positive, got {h}x{w}")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, h, w, generator=gen)
    with torch.no_grad():
        ref = model(example)
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or ref.shape[0] != 2:
        shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ExportError(f"{run}: the eval-mode network must return features [B, D]; got {shape} for 2 images")
    dst = Path(out) if out is not None else run / "export" / "model.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        try:
            proto = _export_graph(model, example, tmp, opset, exporter)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"{run}: cannot export the {geno.space} network to ONNX (opset {opset}, "
                              f"{exporter} exporter): {_short_reason(e)}") from e
        mean, std = _norm_stats(recipe)
        meta = {
            "nasreid.version": __version__,
            "nasreid.space": geno.space,
            "nasreid.genotype": json.dumps(geno.to_dict(), sort_keys=True, separators=(",", ":"), default=str),
            "nasreid.run_name": recipe.name,
            "input.name": "images", "input.layout": "NCHW", "input.height": str(h), "input.width": str(w),
            "input.channel_order": "RGB", "input.dtype": "float32", "input.pixel_divisor": "255",
            "input.mean": json.dumps(mean), "input.std": json.dumps(std), "input.resize": "bilinear, antialias, uint8",
            "output.name": "features", "output.feature_dim": str(int(ref.shape[1])),
            "output.l2_normalized": "false", "output.eval_metric": recipe.eval.metric,
            "output.eval_flip": "true" if recipe.eval.flip else "false",
        }
        keep = [p for p in proto.metadata_props if p.key not in meta]
        del proto.metadata_props[:]
        proto.metadata_props.extend(keep)
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.doc_string = (f"nasreid {__version__} {geno.space} re-ID network: images [B,3,{h},{w}] float32 "
                            f"(RGB/255, (x-mean)/std) -> features [B,{int(ref.shape[1])}] float32, not L2-normalised. "
                            "See metadata_props.")
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:
            raise ExportError(f"{run}: the exported ONNX model is invalid: {_short_reason(e)}") from e
        onnx.save(proto, str(tmp))
        os.replace(tmp, dst)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            if leftover.exists():
                leftover.unlink()
    return dst


# ---------------------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------------------
def _topk(feats: np.ndarray, nq: int, k: int) -> np.ndarray:
    """Indices ``[nq, k]`` of the ``k`` nearest gallery rows of each query row by cosine distance (stable)."""
    f = feats.astype(np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - f[:nq] @ f[nq:].T
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def check_parity(run_dir: str | os.PathLike, onnx_path: str | os.PathLike | None = None, num_query: int = 64,
                 num_gallery: int = 256, topk: int = 10, atol: float = 1e-4, batch_sizes: Sequence[int] = (1, 16),
                 providers: Sequence[str] = ("CPUExecutionProvider",), save: bool = True) -> dict[str, Any]:
    """Compare PyTorch and onnxruntime features of the run's network on real test images (module docstring).

    Args:
        run_dir: the retrain run folder the ONNX file was exported from.
        onnx_path: the ONNX file; default ``RUN/export/model.onnx``.
        num_query, num_gallery: how many of the first query / gallery images (record order) of the dataset in
            the run's recipe (``data.dataset``, root resolved with ``$NASREID_DATA``) to use; fewer when the
            split is smaller.
        topk: ranks compared per query (capped at the gallery size).
        atol: largest allowed absolute feature difference.
        batch_sizes: ONNX batch sizes to run (at least two different ones, to exercise the dynamic axis).
        providers: onnxruntime execution providers (default CPU; intra-op threads = ``torch.get_num_threads()``).
        save: write the report to ``RUN/export/parity.json``.

    Returns:
        The report: ``passed`` (bool), ``max_abs_diff`` (float, feature units), ``max_abs_feature`` (the largest
        ``|f_torch|``, for scale), ``max_abs_diff_per_batch_size`` ({batch size: float}), ``topk``,
        ``rankings_identical`` and ``top{topk}_identical`` (bool, all queries and batch sizes),
        ``num_queries_ranking_differs``, ``atol``, ``num_query``, ``num_gallery``, ``feature_dim``,
        ``batch_sizes``, ``providers`` (those the session used), ``input_size`` ``[H, W]``, ``dataset``,
        ``onnx``, ``opset``, timings ``load_seconds``, ``torch_seconds``, ``onnx_seconds`` ({batch size:
        seconds for all images}), ``torch_ms_per_image``, ``onnx_ms_per_image`` ({batch size: ms}), and
        versions ``torch_version``, ``onnxruntime_version``.

    Raises:
        ExportError: onnx / onnxruntime missing, no ONNX file, fewer than two distinct batch sizes, an input
            size of the ONNX file that differs from the recipe's, or an empty query or gallery split.
        RunFolderError / CheckpointError / GenotypeError: not a retrain run folder (:func:`load_run_model`).
        DatasetLayoutError / FileNotFoundError / CorruptImageError: the run's dataset cannot be read.
    """
    from nasreid.config import resolve_data_root
    from nasreid.data import build_dataset, build_transforms
    from nasreid.engine.runs import load_run_model

    onnx, ort = _require("onnx", "onnxruntime")
    run = Path(run_dir)
    path = Path(onnx_path) if onnx_path is not None else run / "export" / "model.onnx"
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path} (export it first: nasreid export {run} --format onnx)")
    sizes = [int(b) for b in batch_sizes]
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise ExportError(f"batch_sizes needs at least two different sizes >= 1, got {list(batch_sizes)}")
    t0 = time.perf_counter()
    model, recipe, _ = load_run_model(run)
    meta = read_metadata(path)
    h, w = recipe.data.height, recipe.data.width
    if "input.height" in meta and (int(meta["input.height"]), int(meta["input.width"])) != (h, w):
        raise ExportError(f"{path} takes {meta['input.height']}x{meta['input.width']} images but the run's recipe "
                          f"evaluates at {h}x{w}; export it with the recipe's size for the parity check")
    ref = recipe.data.dataset
    dataset = build_dataset(ref.name, resolve_data_root(ref.root), **ref.kwargs)
    query, gallery = list(dataset.query[:max(0, num_query)]), list(dataset.gallery[:max(0, num_gallery)])
    if not query or not gallery:
        raise ExportError(f"{run}: the parity check needs query and gallery images; got {len(query)} query and "
                          f"{len(gallery)} gallery images of {ref.name!r} (num_query={num_query}, "
                          f"num_gallery={num_gallery})")
    mean, std = _norm_stats(recipe)
    tf = build_transforms(h, w, is_train=False, mean=mean, std=std)
    images = torch.stack([tf(dataset.read_image(r)) for r in query + gallery])
    load_s = time.perf_counter() - t0

    t = time.perf_counter()
    with torch.no_grad():
        f_torch = torch.cat([model(images[i:i + 64]) for i in range(0, len(images), 64)]).float().numpy()
    torch_s = time.perf_counter() - t

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=list(providers))
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    x = images.numpy()
    nq, k = len(query), max(1, min(int(topk), len(gallery)))
    rank_ref = _topk(f_torch, nq, k)
    diffs, onnx_s, differs = {}, {}, np.zeros(nq, dtype=bool)
    for b in sizes:
        t = time.perf_counter()
        f_onnx = np.concatenate([sess.run([out_name], {in_name: x[i:i + b]})[0] for i in range(0, len(x), b)])
        onnx_s[b] = time.perf_counter() - t
        if f_onnx.shape != f_torch.shape:
            raise ExportError(f"{path}: ONNX features have shape {f_onnx.shape} at batch size {b}, PyTorch "
                              f"{f_torch.shape}")
        diffs[b] = float(np.abs(f_onnx.astype(np.float64) - f_torch.astype(np.float64)).max())
        differs |= (_topk(f_onnx, nq, k) != rank_ref).any(axis=1)
    max_diff = max(diffs.values())
    identical = not bool(differs.any())
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    n = len(x)
    report: dict[str, Any] = {
        "passed": bool(max_diff <= atol and identical),
        "max_abs_diff": max_diff,
        "max_abs_feature": float(np.abs(f_torch).max()),
        "max_abs_diff_per_batch_size": {str(b): d for b, d in diffs.items()},
        "atol": float(atol),
        "topk": k,
        "rankings_identical": identical,
        f"top{k}_identical": identical,
        "num_queries_ranking_differs": int(differs.sum()),
        "num_query": nq,
        "num_gallery": len(gallery),
        "feature_dim": int(f_torch.shape[1]),
        "input_size": [h, w],
        "batch_sizes": sizes,
        "providers": list(sess.get_providers()),
        "dataset": ref.name,
        "onnx": str(path),
        "opset": opset,
        "load_seconds": load_s,
        "torch_seconds": torch_s,
        "torch_ms_per_image": 1000.0 * torch_s / n,
        "onnx_seconds": {str(b): s for b, s in onnx_s.items()},
        "onnx_ms_per_image": {str(b): 1000.0 * s / n for b, s in onnx_s.items()},
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
    }
    if save:
        from nasreid.engine.checkpoint import write_json

        (run / "export").mkdir(parents=True, exist_ok=True)
        write_json(run / "export" / "parity.json", report)
    return report


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def run_export(run_dir: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None,
               opset: int | None = None, parity: bool = True, num_query: int = 64, num_gallery: int = 256,
               topk: int = 10, atol: float = 1e-4, batch_sizes: Sequence[int] = (1, 16),
               exporter: str = "dynamo") -> dict[str, Any]:
    """``nasreid export RUN --format onnx``: :func:`export_onnx`, then (``parity``) :func:`check_parity`.

    Args:
        run_dir: a retrain run folder.
        fmt: export format; only ``"onnx"``.
        out, opset, exporter: as :func:`export_onnx` (default ``RUN/export/model.onnx``, :func:`default_opset`).
        parity: run :func:`check_parity` (writes ``RUN/export/parity.json``).
        num_query, num_gallery, topk, atol, batch_sizes: as :func:`check_parity`.

    Returns:
        ``{"run", "format", "path", "opset", "exporter", "size_bytes", "export_seconds", "feature_dim",
        "input_size", "parity"}``: ``parity`` is the :func:`check_parity` report (``None`` without ``parity``;
        its ``passed`` says whether the ONNX features match -- this function does not raise when they do not,
        the caller decides) and ``parity_path`` its file.

    Raises:
        ExportError: unknown ``fmt``, and everything :func:`export_onnx` / :func:`check_parity` raise.
        RunFolderError / CheckpointError / GenotypeError: not a retrain run folder.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {list(FORMATS)}")
    run = Path(run_dir)
    if opset is None:
        opset = default_opset(exporter)
    t = time.perf_counter()
    path = export_onnx(run, out=out, opset=opset, exporter=exporter)
    export_s = time.perf_counter() - t
    meta = read_metadata(path)
    summary: dict[str, Any] = {
        "run": str(run), "format": fmt, "path": str(path), "opset": opset, "exporter": exporter,
        "size_bytes": path.stat().st_size, "export_seconds": export_s,
        "feature_dim": int(meta["output.feature_dim"]),
        "input_size": [int(meta["input.height"]), int(meta["input.width"])], "parity": None, "parity_path": None,
    }
    if parity:
        summary["parity"] = check_parity(run, path, num_query=num_query, num_gallery=num_gallery, topk=topk,
                                         atol=atol, batch_sizes=batch_sizes)
        summary["parity_path"] = str(run / "export" / "parity.json")
    return summary
