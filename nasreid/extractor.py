"""Re-ID features of images with a trained nasreid network: :class:`FeatureExtractor`.

Give it a network (a run folder, a genotype + weights, or a module) and call it on images; it returns one
L2-normalised feature vector per image, computed exactly as nasreid's evaluation computes them
(:func:`nasreid.data.build_test_loaders` + :func:`nasreid.evaluation.features.extract_features` with
``normalize=True``): the same test transforms (resize to ``height × width`` with antialiasing, ``/ 255``,
``(x - mean) / std``), the network in eval mode, optional flip averaging, then ``f / ||f||_2``.

Example::

    >>> from nasreid.extractor import FeatureExtractor
    >>> fx = FeatureExtractor.from_run("results/osnet_ain_cpu_retrain-20250101-120000")   # doctest: +SKIP
    >>> q = fx(["query/0001_c1.jpg", "query/0002_c1.jpg"])                                # doctest: +SKIP
    >>> g = fx(gallery_paths)                                                             # doctest: +SKIP
    >>> dist = 1 - q @ g.T          # cosine distance [2, len(gallery_paths)]             # doctest: +SKIP

Accepted inputs (``FeatureExtractor.__call__``):

* a file path (``str`` / ``os.PathLike``) or a list of them (read as RGB, as the datasets read images);
* a ``PIL.Image`` (any mode, converted to RGB) or a list of them;
* a ``numpy`` ``uint8`` array ``[H, W, 3]`` (one RGB image, e.g. ``np.asarray(pil_image)``), a list of them,
  or a ``uint8`` array ``[N, H, W, 3]``;
* a ``torch`` tensor ``[B, 3, H, W]`` or ``[3, H, W]``: floating point RGB in ``[0, 1]`` (what
  ``torchvision.transforms.functional.to_tensor`` gives; refused outside ``[-0.25, 1.25]``, which catches
  already-normalised and 0-255 float images) or ``uint8`` RGB in ``[0, 255]`` (what
  ``torchvision.io.decode_image`` gives); any size, on any device;
* a list mixing paths, PIL images, ``[H, W, 3]`` arrays and ``[3, H, W]`` tensors.

Resizing follows the evaluation transform (:func:`~nasreid.data.transforms.build_transforms`, ``is_train=False``):
the image becomes a ``uint8`` tensor (``v2.ToImage``) and is resized to ``height × width`` on that tensor by
torchvision (``v2.Resize``: bilinear, ``antialias=True``, result rounded to 8 bits), then divided by 255 and
normalised. So files, PIL images, ``uint8`` arrays and ``uint8`` tensors of any size give exactly the
evaluation's features. A float tensor is resized in floating point (``v2.functional.resize``, bilinear,
``antialias=True``, no rounding to 8 bits), which is close to but not bit-identical with resizing the 8-bit
image; a float tensor that already has the extractor's ``height × width`` is not resized, so ``to_tensor`` of an
image already resized as above gives the evaluation's features.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nasreid.data.datasets.base import CorruptImageError, read_image_file
from nasreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from nasreid.errors import NasreidError

__all__ = ["ExtractorError", "FeatureExtractor"]

#: float tensors outside this range are refused (already normalised, or in 0-255 units); the margin tolerates
#: the overshoot of bicubic resizing.
_FLOAT_RANGE = (-0.25, 1.25)
_ACCEPTED = ("a path, a PIL image, a uint8 [H, W, 3] array, a uint8 [N, H, W, 3] array, a tensor [B, 3, H, W] or "
             "[3, H, W], or a list of paths / PIL images / [H, W, 3] arrays / [3, H, W] tensors")

Inputs = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor | Sequence[Any]


class ExtractorError(NasreidError, ValueError):
    """An input the extractor cannot use -- wrong type, dtype, shape or value range, an empty list -- or a bad
    constructor argument; the message names the input (``inputs``, ``inputs[3]``) or the argument."""


def _recipe_norm(recipe) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of a run's test transforms: the recipe's ``data.augment.mean/std`` where the recipe schema has
    them, else the ImageNet statistics :func:`~nasreid.data.transforms.build_transforms` uses by default."""
    aug = recipe.data.augment
    mean = getattr(aug, "mean", None) or getattr(recipe.data, "mean", None) or IMAGENET_MEAN
    std = getattr(aug, "std", None) or getattr(recipe.data, "std", None) or IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _describe(x: Any) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__module__.split('.')[0]} {type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _state_dict(weights: Any) -> tuple[dict[str, torch.Tensor], int | None, str, Any]:
    """``(state_dict, num_classes or None, source, the checkpoint's genotype dict or None)`` from a weights file or
    a (checkpoint) mapping. Files are read by nasreid's one weights reader
    (:func:`nasreid.models.weights.read_weights`: a torch file with ``weights_only=True`` -- tensors and plain
    containers only, safe for files from others; nasreid's ``model.pt`` reads so too -- or a ``.safetensors``
    file); the keys are named by the weights format the file is recognised as (``auto``,
    :data:`~nasreid.models.weights.WEIGHT_FORMATS`: torchreid's OSNet-family files are translated to nasreid's
    names, :mod:`nasreid.models.torchreid`)."""
    from nasreid.engine.checkpoint import CheckpointError
    from nasreid.models.weights import PretrainedWeightsError, file_naming, read_weights, state_dict_of

    try:
        if isinstance(weights, (str, os.PathLike)):
            if not Path(weights).is_file():
                raise CheckpointError(f"weights file not found: {weights}")
            wf = read_weights(weights)
            src, state, extra = wf.source, wf.state, wf.extra
        elif isinstance(weights, Mapping):
            src = "the given state_dict"
            state, extra = state_dict_of(weights, src)
        else:
            raise ExtractorError(f"weights must be a checkpoint path or a state_dict, got {type(weights).__name__}")
        rename, _ = file_naming(state, src)
    except PretrainedWeightsError as e:
        more = (" (a training checkpoint such as checkpoints/last.pt? use the run's model.pt or "
                "FeatureExtractor.from_run)") if "objects other than tensors" in str(e) else ""
        raise CheckpointError(f"{e}{more}") from None
    if rename is not None:  # e.g. a torchreid model-zoo file: the presets osnet / osnet_ibn / osnet_ain_torchreid
        names = {k: rename(k) for k in state}
        unknown = [k for k, v in names.items() if v is None]
        if unknown:
            raise CheckpointError(f"{src}: keys outside its weights format's name map: {unknown[:5]}")
        state = {str(names[k]): v for k, v in state.items()}
    num_classes = extra.get("num_classes")
    return state, (int(num_classes) if num_classes is not None else None), src, extra.get("genotype")


class FeatureExtractor:
    """L2-normalised re-ID features of images, computed as nasreid's evaluation computes them.

    Args:
        model_or_genotype: the network: an ``nn.Module`` mapping ``[B, 3, H, W]`` to ``[B, D]`` in eval mode
            (used as is, moved to ``device``), a :class:`~nasreid.genotype.Genotype`, a ``genotype.json`` path,
            or ``"preset:<name>"`` (a preset of ``space``, :func:`~nasreid.genotype.preset_genotype`), or
            ``None``: the genotype stored in the ``weights`` checkpoint (``model.pt`` written by ``nasreid train``
            holds it).
        weights: ``model.pt`` / a checkpoint path (a dict with a ``"model"`` state_dict, as training writes), a
            plain state_dict file (a torchreid model-zoo file too: its names are translated, e.g.
            ``FeatureExtractor("preset:osnet", "osnet_x0_25_msmt17.pth", space="osnet_ain",
            space_kwargs={"width_mult": 0.25})``), or a state_dict / checkpoint mapping. Loaded strictly. ``None``: the
            network's own (for a genotype, random) weights -- only meaningful for tests.
        space: the search space of a ``"preset:<name>"`` genotype (e.g. ``"osnet_ain"``).
        space_kwargs: constructor arguments of the space for a preset (e.g. ``{"width_mult": 0.25}``); they
            update a genotype's ``space_kwargs``.
        num_classes: classifier size to build the network with (the classifier is unused for features, but the
            weights must fit); default: the checkpoint's ``num_classes``, else the rows of a 2-D
            ``classifier`` weight of the state_dict, else 0.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a ``torch.device``); features are returned there.
        height, width: input size in pixels the network expects (a run's ``data.height`` / ``data.width``).
        mean, std: per-channel RGB normalisation in ``[0, 1]`` units (default ImageNet, as the recipes use).
        batch_size: images per forward pass (memory bound; results do not depend on it beyond float rounding).
        flip: average the features of each image and of its horizontal mirror before normalising (a run's
            ``eval.flip``).
        amp: run the network under ``torch.autocast`` in float16 (CUDA only); features are float32.
        progress: show a tqdm progress bar when a call takes more than one batch; ``None`` (default): when
            stderr is a terminal. ``NASREID_NO_PROGRESS`` set in the environment always disables it.

    Calling the extractor (:meth:`__call__`) returns a ``float32`` tensor ``[B, D]`` on ``device``, one row per
    image in input order, each of L2 norm 1 (cosine similarity = dot product). Move it with ``.cpu()`` /
    ``.numpy()`` as usual.

    Raises:
        ExtractorError: a bad argument (unknown ``model_or_genotype`` type, a preset without ``space``, a run
            folder given as genotype, ``None`` with weights that hold no genotype, ``batch_size < 1``, ``amp``
            off CUDA, CUDA requested but unavailable).
        ValueError: ``mean`` / ``std`` not of length 3.
        GenotypeError: an unreadable genotype, an unknown preset or space, choices that do not fit the space.
        CheckpointError: an unreadable weights file, or weights that do not fit the network (names the file).
    """

    def __init__(self, model_or_genotype: Any, weights: Any = None, *, space: str | None = None,
                 space_kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None,
                 device: str | torch.device = "cpu", height: int = 256, width: int = 128,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, batch_size: int = 64,
                 flip: bool = False, amp: bool = False, progress: bool | None = None):
        from nasreid.engine.checkpoint import CheckpointError
        from nasreid.genotype import Genotype, GenotypeError, preset_genotype

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ExtractorError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExtractorError(f"{name} must be a positive integer, got {v!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ExtractorError(f"device: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ExtractorError(f"device {str(self.device)!r} requested but CUDA is not available")
        if amp and self.device.type != "cuda":
            raise ExtractorError(f"amp=True needs a CUDA device, got device {str(self.device)!r}")

        self.genotype: Genotype | None = None
        state, src, ck_classes, ck_geno = None, None, None, None
        if weights is not None:
            state, ck_classes, src, ck_geno = _state_dict(weights)
        if model_or_genotype is None:
            if not isinstance(ck_geno, Mapping):
                raise ExtractorError("model_or_genotype is None, so the genotype must come from the weights, but "
                                     f"{src or 'weights=None'} holds none (give a genotype or a model.pt written "
                                     "by nasreid train)")
            model_or_genotype = Genotype.from_dict(dict(ck_geno), source=f"{src}: genotype")
        if isinstance(model_or_genotype, nn.Module):
            model = model_or_genotype
        else:
            g = model_or_genotype
            if isinstance(g, str) and g.startswith("preset:"):
                if not space:
                    raise ExtractorError(f"{g!r}: a preset needs the space, e.g. "
                                         f"FeatureExtractor({g!r}, weights, space='osnet_ain')")
                g = preset_genotype(space, g[len("preset:"):])
            elif isinstance(g, (str, os.PathLike)):
                if Path(g).is_dir():
                    raise ExtractorError(f"{g} is a folder; for a run folder use FeatureExtractor.from_run({str(g)!r})")
                g = Genotype.load(g)
            elif not isinstance(g, Genotype):
                raise ExtractorError("model_or_genotype must be an nn.Module, a Genotype, a genotype.json path or "
                                     f"'preset:<name>', got {type(g).__name__}")
            if space is not None and g.space != space:
                raise GenotypeError(f"the genotype is for space {g.space!r}, not {space!r}")
            if space_kwargs:
                g = Genotype(space=g.space, choices=dict(g.choices), probabilities=dict(g.probabilities),
                             space_kwargs={**g.space_kwargs, **dict(space_kwargs)}, provenance=dict(g.provenance))
            if num_classes is None:
                num_classes = ck_classes
            if num_classes is None and state is not None:
                w = [v for k, v in state.items() if "classifier" in k and k.endswith("weight") and v.dim() == 2]
                num_classes = int(w[0].shape[0]) if w else 0
            model = g.build(num_classes=int(num_classes or 0))
            self.genotype = g
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                what = f"the network of genotype space {self.genotype.space!r}" if self.genotype else "the model"
                detail = " ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()) or str(e)
                if len(detail) > 300:
                    detail = detail[:300] + " ..."
                raise CheckpointError(f"{src}: the weights do not fit {what} (check the genotype's space_kwargs and "
                                      f"num_classes): {detail}") from None
        self.model = model.to(self.device).eval()
        self.height, self.width = int(height), int(width)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        #: the evaluation's test transform: RGB ``PIL.Image`` (or uint8/float tensor image) -> ``[3, H, W]``
        self.transform = build_transforms(self.height, self.width, is_train=False, mean=self.mean, std=self.std)
        self.batch_size = batch_size
        self.flip = bool(flip)
        self.amp = bool(amp)
        self.progress = progress
        self._feature_dim: int | None = None

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu", *, batch_size: int = 64,
                 flip: bool | None = None, amp: bool = False, progress: bool | None = None) -> FeatureExtractor:
        """The extractor of a retrain run folder's network, with the run's input size, normalisation and
        ``eval.flip`` (``flip=None``; pass ``True`` / ``False`` to override).

        Weights come from ``model.pt`` (or ``checkpoints/last.pt``), via
        :func:`nasreid.engine.runs.load_run_model`.

        Raises:
            RunFolderError / GenotypeError / CheckpointError: not a retrain run folder, or weights that are
                missing or do not fit; ExtractorError: as the constructor.
        """
        from nasreid.engine.runs import load_run_model

        model, recipe, geno = load_run_model(run_dir)
        mean, std = _recipe_norm(recipe)
        fx = cls(model, device=device, height=recipe.data.height, width=recipe.data.width, mean=mean, std=std,
                 batch_size=batch_size, flip=recipe.eval.flip if flip is None else flip, amp=amp, progress=progress)
        fx.genotype = geno
        return fx

    @property
    def feature_dim(self) -> int:
        """``D``, the length of a feature vector (one forward pass of a blank image, the first time)."""
        if self._feature_dim is None:
            self._feature_dim = int(self._forward(torch.zeros(1, 3, self.height, self.width)).shape[1])
        return self._feature_dim

    def __repr__(self) -> str:
        space = f"space={self.genotype.space!r}, " if self.genotype is not None else ""
        return (f"FeatureExtractor({space}device={str(self.device)!r}, input={self.height}x{self.width}, "
                f"flip={self.flip}, amp={self.amp}, batch_size={self.batch_size})")

    # ---------------------------------------------------------------------------------------------------
    def _check_tensor(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """A ``[B, 3, H, W]`` uint8 or float32 tensor from a ``[3, H, W]`` / ``[B, 3, H, W]`` input."""
        given = x
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ExtractorError(f"{where}: expected a tensor [B, 3, H, W] or [3, H, W] (RGB, channels first), "
                                 f"got {_describe(given)}")
        if x.dtype == torch.uint8:
            return x
        if not x.is_floating_point():
            raise ExtractorError(f"{where}: expected a float tensor with values in [0, 1] or a uint8 tensor, got "
                                 f"{_describe(x)}")
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            raise ExtractorError(f"{where}: the tensor holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < _FLOAT_RANGE[0] or hi > _FLOAT_RANGE[1]:
            raise ExtractorError(f"{where}: float images must be un-normalised RGB in [0, 1] (as to_tensor gives); "
                                 f"got values in [{lo:.3g}, {hi:.3g}] -- already normalised, or in 0-255 units? "
                                 "(clamp(0, 1) small interpolation overshoots)")
        return x

    def _check_array(self, a: np.ndarray, where: str, batch_ok: bool) -> np.ndarray:
        """A ``[N, H, W, 3]`` uint8 array from ``[H, W, 3]`` (or ``[N, H, W, 3]`` when ``batch_ok``)."""
        if a.dtype != np.uint8:
            raise ExtractorError(f"{where}: expected a uint8 RGB array [H, W, 3]"
                                 f"{' or [N, H, W, 3]' if batch_ok else ''}, got {_describe(a)} (convert float "
                                 "images with (a * 255).round().astype(np.uint8), or pass a torch tensor)")
        if a.ndim == 3 and a.shape[2] == 3:
            a = a[None]
        elif not (batch_ok and a.ndim == 4 and a.shape[3] == 3):
            hint = " (channels first? transpose to [H, W, 3])" if a.ndim in (3, 4) and a.shape[-3] == 3 else ""
            raise ExtractorError(f"{where}: expected a uint8 RGB array [H, W, 3]"
                                 f"{' or [N, H, W, 3]' if batch_ok else ''}, got {_describe(a)}{hint}")
        if 0 in a.shape:
            raise ExtractorError(f"{where}: empty array {_describe(a)}")
        return a

    def _item(self, obj: Any, where: str) -> torch.Tensor:
        """One image -> its preprocessed ``[3, height, width]`` float32 tensor (CPU)."""
        if isinstance(obj, (str, os.PathLike)):
            try:
                img = read_image_file(obj)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{where}: {e}") from None
            except CorruptImageError as e:
                raise CorruptImageError(f"{where}: {e}", path=e.path) from e.__cause__
            return self.transform(img)
        if isinstance(obj, Image.Image):
            return self.transform(obj if obj.mode == "RGB" else obj.convert("RGB"))
        if isinstance(obj, np.ndarray):
            return self.transform(Image.fromarray(np.ascontiguousarray(self._check_array(obj, where, False)[0])))
        if isinstance(obj, torch.Tensor):
            if obj.dim() != 3:
                raise ExtractorError(f"{where}: a list element must be one image [3, H, W], got {_describe(obj)}")
            return self._tensor_batch(self._check_tensor(obj, where))[0]
        raise ExtractorError(f"{where}: expected {_ACCEPTED}; got {_describe(obj)}")

    def _tensor_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` (uint8, or float in [0, 1]) -> resized, normalised ``[b, 3, height, width]`` float32."""
        return self.transform(x).float()

    def _batches(self, inputs: Any) -> tuple[int, Iterator[torch.Tensor]]:
        """``(number of images, iterator over preprocessed batches [b, 3, height, width])``."""
        bs = self.batch_size
        if isinstance(inputs, torch.Tensor):
            x = self._check_tensor(inputs, "inputs")
            return len(x), (self._tensor_batch(x[i:i + bs]) for i in range(0, len(x), bs))
        if isinstance(inputs, np.ndarray):
            a = self._check_array(inputs, "inputs", True)
            return len(a), (torch.stack([self.transform(Image.fromarray(np.ascontiguousarray(im)))
                                         for im in a[i:i + bs]]) for i in range(0, len(a), bs))
        if isinstance(inputs, (str, os.PathLike, Image.Image)):
            return 1, iter([self._item(inputs, "inputs").unsqueeze(0)])
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ExtractorError("inputs: empty list, no image to extract features from")
            items = list(inputs)
            return len(items), (torch.stack([self._item(o, f"inputs[{j}]") for j, o in enumerate(items[i:i + bs], i)])
                                for i in range(0, len(items), bs))
        raise ExtractorError(f"inputs: expected {_ACCEPTED}; got {_describe(inputs)}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[b, 3, H, W]`` -> L2-normalised ``[b, D]`` float32 on ``self.device`` (the
        operations of :func:`nasreid.evaluation.features.extract_features`, in its order)."""
        x = x.to(self.device, non_blocking=True)
        autocast = torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            f = self.model(x)
            if self.flip:
                f = f.float() + self.model(torch.flip(x, dims=[3])).float()
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ExtractorError(f"the network must return features [B, D] in eval mode; got {got} for a batch "
                                 f"of {x.shape[0]} images")
        f = f.float()
        if self.flip:
            f = f / 2
        return F.normalize(f, p=2, dim=1)

    def _show_progress(self, n: int) -> bool:
        if os.environ.get("NASREID_NO_PROGRESS") or self.progress is False or n <= self.batch_size:
            return False
        if self.progress is None:
            from nasreid.engine.progress import progress_enabled

            return progress_enabled()
        return True

    @torch.no_grad()
    def __call__(self, inputs: Inputs) -> torch.Tensor:
        """Features of ``inputs`` (any kind listed in the module docstring).

        Returns:
            ``float32`` tensor ``[B, D]`` on the extractor's ``device``: one L2-normalised row per image, in
            input order (``B = 1`` for a single image).

        Raises:
            ExtractorError: an unsupported type, a wrong dtype or shape (e.g. a ``[3, H, W]`` array, a float
                array, a 1-channel tensor), float values outside ``[0, 1]``, an empty list, or a network that
                does not return ``[B, D]``; the message names the input (``inputs`` / ``inputs[i]``).
            FileNotFoundError: a path that does not exist (the message names it and its list index).
            CorruptImageError: a file that cannot be decoded (names it).
        """
        from tqdm.auto import tqdm

        n, batches = self._batches(inputs)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            with tqdm(total=n, desc="features", unit="img", leave=False, disable=not self._show_progress(n)) as bar:
                for x in batches:
                    out.append(self._forward(x))
                    bar.update(len(x))
        finally:
            self.model.train(was_training)
        f = torch.cat(out, 0)
        self._feature_dim = int(f.shape[1])
        return f
