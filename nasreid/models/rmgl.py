"""Building blocks of RMGL: receptive partition, activation balanced pooling and the dual-path branch.

Reference: G. Wang, Y. Yuan, J. Li, S. Ge, X. Zhou, "Receptive Multi-granularity Representation for Person
Re-Identification", IEEE Transactions on Image Processing 29, 2020: Sec. III-A (framework, Eq. 1-4,
Fig. 2), Sec. III-B (receptive partition, Eq. 5-7, Fig. 3b), Sec. III-C (activation balanced pooling,
Eq. 8-11), Sec. IV-A (implementation).

The authors released no code. This module is a re-implementation from the paper's text and equations;
where the paper leaves a detail open, the choice made here is stated in the docstring concerned.

* :func:`stripe_starts`, :func:`receptive_partition`, :func:`merge_partitions` -- the receptive partition
  (RP) of an intermediate map into ``n`` horizontal stripes stacked along the batch, and back (Sec. III-B).
* :func:`uniform_boundaries`, :func:`abp_boundaries`, :func:`stripe_pool` -- stripe boundaries on a final
  map (uniform, or balanced by the rows of the channels' maxima, Eq. 8-10) and the pooling of the rows
  between them (Eq. 11).
* :class:`FeatureReduction` -- 1x1 convolution (no bias) + BN on a pooled feature (Sec. III-A).
* :class:`RMGLBranch` -- one branch ``g_i`` of Fig. 2: its stages, the original and the receptive
  partitioned path (shared weights), global + stripe max pooling, a reduction and an identity classifier
  per pooled feature.

Shapes use ``B`` images, ``C`` channels, ``H x W`` rows x columns of a feature map, ``n`` stripes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "ABP_POOLS",
    "FeatureReduction",
    "RMGLBranch",
    "abp_boundaries",
    "equal_stripe_pool",
    "merge_partitions",
    "receptive_partition",
    "stripe_pool",
    "stripe_starts",
    "uniform_boundaries",
]

#: Pooling of the rows of an ABP stripe: ``"max"`` (the GMP of training) or ``"avg"`` (Eq. 11 as printed).
ABP_POOLS = ("max", "avg")


def _check_stripes(n: int, height: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of stripes must be an integer >= 1, got {n!r}")
    if n > height:
        raise ValueError(f"cannot cut {what} of height {height} into {n} stripes of at least one row each")


def stripe_starts(height: int, n: int) -> tuple[int, list[int]]:
    """Stripe height and first rows of the ``n`` receptive-partition stripes of a map ``height`` rows high.

    All stripes have the same height ``hs = ceil(height / n)`` (RP stacks them along the batch, Sec. III-B,
    so they must share one shape) and start at ``round(k * (height - hs) / (n - 1))``, ``k = 0 .. n-1``
    (rounding half up), so the first stripe starts at row 0 and the last one ends at the last row. When
    ``height`` is divisible by ``n`` the stripes are exactly the uniform, non-overlapping partition of the
    paper (``hs = height / n``, starts ``k * hs``). Otherwise consecutive stripes overlap by one or a few rows
    (e.g. ``height=16, n=3``: ``hs=6``, rows 0-5, 5-10, 10-15); the paper does not say how it splits such
    maps. ``n = 1`` gives the whole map.

    Args:
        height: rows of the map (>= 1).
        n: number of stripes, ``1 <= n <= height``.

    Returns:
        ``(hs, starts)``: the stripe height in rows and the ``n`` first rows (increasing).

    Raises:
        ValueError: ``n`` not an integer >= 1, or ``n > height``.
    """
    if isinstance(height, bool) or not isinstance(height, int) or height < 1:
        raise ValueError(f"height must be an integer >= 1, got {height!r}")
    _check_stripes(n, height, "a map")
    hs = -(-height // n)
    if n == 1:
        return hs, [0]
    span = height - hs
    # floor(k * span / (n - 1) + 1/2) in integers: round half up
    return hs, [(2 * k * span + (n - 1)) // (2 * (n - 1)) for k in range(n)]


def receptive_partition(x: torch.Tensor, n: int) -> torch.Tensor:
    """Receptive partition (Sec. III-B, Fig. 3b): cut ``x`` into ``n`` horizontal stripes (see
    :func:`stripe_starts`) and stack them along the batch dimension.

    The stripes then run through the rest of the network as separate images with the same weights, which
    restricts the receptive region of every output neuron to its stripe (Eq. 6-7).

    Args:
        x: ``[B, C, H, W]`` intermediate feature map.
        n: number of stripes, ``1 <= n <= H``.

    Returns:
        ``[n * B, C, hs, W]`` with ``hs = ceil(H / n)``; stripe-major: rows ``k * B .. (k+1) * B - 1`` hold
        stripe ``k`` of the ``B`` images (undo with :func:`merge_partitions`).

    Raises:
        ValueError: ``x`` not 4-D, ``n`` not an integer >= 1, or ``n > H``.
    """
    if x.dim() != 4:
        raise ValueError(f"receptive_partition needs a [B, C, H, W] map, got shape {tuple(x.shape)}")
    _check_stripes(n, x.shape[2], "a feature map")
    hs, starts = stripe_starts(x.shape[2], n)
    if n == 1:
        return x
    return torch.cat([x[:, :, s:s + hs] for s in starts], dim=0)


def merge_partitions(y: torch.Tensor, n: int) -> torch.Tensor:
    """Split the stripe-major batch of :func:`receptive_partition` back into its ``n`` stripes.

    Args:
        y: ``[n * B, ...]`` outputs of the network on the stacked stripes.
        n: number of stripes (>= 1, divides ``y.shape[0]``).

    Returns:
        ``[n, B, ...]`` (a view): ``out[k]`` is stripe ``k`` of every image.

    Raises:
        ValueError: ``n`` not an integer >= 1, or ``y.shape[0]`` not a multiple of ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of stripes must be an integer >= 1, got {n!r}")
    if y.dim() < 1 or y.shape[0] % n:
        raise ValueError(f"merge_partitions: batch {tuple(y.shape)[:1]} is not a multiple of n={n}")
    return y.unflatten(0, (n, y.shape[0] // n))


def uniform_boundaries(fmap: torch.Tensor, n: int) -> torch.Tensor:
    """Row boundaries of ``n`` uniform stripes, ``h_k = round(k * H / n)`` (half up), for every image.

    Args:
        fmap: ``[B, C, H, W]`` (only its shape and device are used).
        n: number of stripes, ``1 <= n <= H``.

    Returns:
        ``LongTensor [B, n + 1]`` with ``0 = h_0 < h_1 < ... < h_n = H``.

    Raises:
        ValueError: ``fmap`` not 4-D, ``n`` not an integer >= 1, or ``n > H``.
    """
    if fmap.dim() != 4:
        raise ValueError(f"uniform_boundaries needs a [B, C, H, W] map, got shape {tuple(fmap.shape)}")
    height = fmap.shape[2]
    _check_stripes(n, height, "a feature map")
    b = torch.tensor([(2 * k * height + n) // (2 * n) for k in range(n + 1)], device=fmap.device)
    return b.unsqueeze(0).expand(fmap.shape[0], -1).clone()


def abp_boundaries(fmap: torch.Tensor, n: int) -> torch.Tensor:
    """Activation balanced stripe boundaries (Sec. III-C, Eq. 8-10), for every image of a batch.

    For each image and channel the location of the spatial maximum is taken (Eq. 8; the first location in
    row-major order on ties, as ``torch.argmax``); its row is counted in a histogram over the ``H`` rows,
    whose cumulative count ``H(h)`` is the number of channels peaking in the first ``h`` rows (Eq. 9;
    ``H(0) = 0``, ``H(H) = C``). Boundary ``k = 1 .. n-1`` is the number of rows ``h`` (1-based) with
    ``H(h) <= ceil(k * C / n)``, i.e. the last ``h_k`` with (Eq. 10)::

        H(h_k) <= ceil(k * C / n) < H(h_k + 1),

    so every stripe holds about ``C / n`` of the channels' maxima. ``h_0 = 0`` and ``h_n = H``. When that
    would leave a stripe empty (many maxima in one row), boundaries are pushed down to ``h_{k-1} + 1`` and
    capped at ``H - (n - k)``, so every stripe keeps at least one row; Eq. 10 then does not hold for the moved
    boundaries. Vectorised over the batch (no Python loop over images).

    Args:
        fmap: ``[B, C, H, W]`` final feature map (any real dtype).
        n: number of stripes, ``1 <= n <= H``.

    Returns:
        ``LongTensor [B, n + 1]``, ``0 = h_0 < h_1 < ... < h_n = H`` (stripe ``k`` is rows
        ``h_k .. h_{k+1} - 1``, 0-based).

    Raises:
        ValueError: ``fmap`` not 4-D, ``n`` not an integer >= 1, or ``n > H``.
    """
    if fmap.dim() != 4:
        raise ValueError(f"abp_boundaries needs a [B, C, H, W] map, got shape {tuple(fmap.shape)}")
    bsz, chans, height, width = fmap.shape
    _check_stripes(n, height, "a feature map")
    with torch.no_grad():
        rows = fmap.detach().flatten(2).argmax(dim=2) // width  # [B, C] row of each channel's maximum
        hist = torch.zeros(bsz, height, dtype=torch.long, device=fmap.device)
        hist.scatter_add_(1, rows, torch.ones_like(rows))
        cum = hist.cumsum(dim=1)  # [B, H]: cum[:, r] = H(r + 1)
        ks = torch.arange(n + 1, device=fmap.device)
        target = (ks * chans + n - 1) // n  # ceil(k C / n), [n + 1]
        raw = (cum.unsqueeze(1) <= target.view(1, -1, 1)).sum(dim=2)  # [B, n + 1], raw[:, k] = h_k of Eq. 10
        raw[:, 0] = 0
        raw[:, n] = height
        # strictly increasing with one row at least per stripe: c_k = h_k - k is made non-decreasing
        # (running maximum) and capped at H - n, which keeps h_0 = 0 and h_n = H
        c = _running_max(raw - ks).clamp(max=height - n)
        return c + ks


def _running_max(x: torch.Tensor) -> torch.Tensor:
    """``torch.cummax(x, dim=1).values`` for ``[B, m]`` with small ``m``, written as ``m - 1`` elementwise maxima
    so that the ONNX exporter can translate it (``aten::cummax`` has no ONNX counterpart)."""
    cols = [x[:, 0]]
    for k in range(1, x.shape[1]):
        cols.append(torch.maximum(cols[-1], x[:, k]))
    return torch.stack(cols, dim=1)


def equal_stripe_pool(y: torch.Tensor, n: int) -> torch.Tensor:
    """Max over ``n`` horizontal stripes of equal height: ``[B, C, H, W] -> [B, C, n]``, exactly
    ``F.adaptive_max_pool2d(y, (n, 1)).flatten(2)`` (stripe ``i`` covers rows ``floor(i H / n)`` to
    ``ceil((i + 1) H / n) - 1``, so stripes overlap by a row when ``n`` does not divide ``H``), written with static
    slices so that it exports to ONNX for every ``H`` (uneven adaptive pooling does not)."""
    height = y.shape[2]
    return torch.stack([y[:, :, (i * height) // n:-((-(i + 1) * height) // n)].amax(dim=(2, 3)) for i in range(n)],
                       dim=2)


def stripe_pool(fmap: torch.Tensor, bounds: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """Pool the rows between per-image boundaries (e.g. from :func:`abp_boundaries`) into stripe features.

    Stripe ``k`` of image ``b`` covers rows ``bounds[b, k] .. bounds[b, k+1] - 1`` and all columns.
    ``mode="max"`` takes the maximum over them (the global max pooling used for every stripe in training,
    Sec. III-A); ``mode="avg"`` the mean, which is Eq. 11 as printed (``1 / ((h_k - h_{k-1}) w)`` times the
    sum over the stripe). Computed with row masks, vectorised over the batch.

    Args:
        fmap: ``[B, C, H, W]``.
        bounds: ``LongTensor [B, n + 1]``, strictly increasing from 0 to ``H``.
        mode: ``"max"`` or ``"avg"``.

    Returns:
        ``[B, C, n]`` stripe features (same dtype as ``fmap``; differentiable w.r.t. ``fmap``).

    Raises:
        ValueError: unknown ``mode``, wrong shapes, or boundaries not strictly increasing from 0 to ``H``.
    """
    if mode not in ABP_POOLS:
        raise ValueError(f"stripe_pool mode must be one of {list(ABP_POOLS)}, got {mode!r}")
    if fmap.dim() != 4:
        raise ValueError(f"stripe_pool needs a [B, C, H, W] map, got shape {tuple(fmap.shape)}")
    bsz, _, height, width = fmap.shape
    if bounds.dim() != 2 or bounds.shape[0] != bsz or bounds.shape[1] < 2:
        raise ValueError(f"bounds must be [B={bsz}, n + 1 >= 2], got shape {tuple(bounds.shape)}")
    # the value check reads the tensor on the host: skipped while torch.export / torch.compile trace the graph
    if not torch.compiler.is_compiling() and (bool((bounds[:, 0] != 0).any()) or bool(
            (bounds[:, -1] != height).any()) or bool((bounds[:, 1:] <= bounds[:, :-1]).any())):
        raise ValueError(f"bounds must increase strictly from 0 to H={height}; got {bounds.tolist()}")
    r = torch.arange(height, device=fmap.device).view(1, 1, height)
    mask = (r >= bounds[:, :-1].unsqueeze(2)) & (r < bounds[:, 1:].unsqueeze(2))  # [B, n, H]
    mask = mask.unsqueeze(1)  # [B, 1, n, H]
    if mode == "max":
        rowmax = fmap.amax(dim=3).unsqueeze(2)  # [B, C, 1, H]
        fill = torch.tensor(float("-inf"), dtype=fmap.dtype, device=fmap.device)
        return torch.where(mask, rowmax, fill).amax(dim=3)
    rowsum = fmap.sum(dim=3).unsqueeze(2)  # [B, C, 1, H]
    count = (bounds[:, 1:] - bounds[:, :-1]).to(fmap.dtype) * width  # [B, n]
    return (rowsum * mask.to(fmap.dtype)).sum(dim=3) / count.unsqueeze(1)


class FeatureReduction(nn.Sequential):
    """Reduction of a pooled feature (Sec. III-A): 1x1 convolution without bias + BN, no activation.

    The paper reduces every global or stripe feature "into 256-d feature vectors ... by 1x1 convolution
    layers with BN layers".

    Shapes: ``[B, C]`` -> ``[B, D]`` (applied as a 1x1 convolution on ``[B, C, 1, 1]``). In training mode
    the BN needs ``B >= 2``.
    """

    def __init__(self, in_ch: int, out_dim: int):
        super().__init__(nn.Conv2d(in_ch, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.view(x.shape[0], -1, 1, 1)).flatten(1)


class RMGLBranch(nn.Module):
    """One branch ``g_i`` of RMGL (Fig. 2) with its original path and, optionally, its receptive
    partitioned path (Fig. 3b); both paths share the branch's weights.

    Original path: the stages run on the branch input; the output map ``[B, C, h, w]`` gives a global
    feature (global max pooling, ``k = 0``) and ``n`` stripe features (max pooling over uniform stripes,
    ``F.adaptive_max_pool2d(y, (n, 1))``, whose windows overlap by a row when ``n`` does not divide ``h``;
    at evaluation with ``abp`` the stripes come from :func:`abp_boundaries` + :func:`stripe_pool` instead,
    Sec. III-C).

    Receptive partitioned path (``rp_stage`` not None): the input of stage ``rp_stage`` (0-based within the
    branch) is cut by :func:`receptive_partition` into ``n`` stripes stacked along the batch, the remaining
    stages run on them (Eq. 6-7), and :func:`merge_partitions` splits the outputs back. Its global feature is
    the maximum over the ``n`` stripe outputs and all their positions, stripe ``k`` the global max pooling of
    stripe ``k``'s output. The stages before ``rp_stage`` run once for both paths. With ``n = 1`` the
    partition is the whole map, so the RP path's map is the original path's (reused, not recomputed).

    Every pooled feature (path ``p`` in {original, RP}, ``k = 0 .. n``) has its own
    :class:`FeatureReduction` to ``reduce_dim`` and, when ``num_classes > 0``, its own identity classifier
    (``nn.Linear``, Eq. 2), in the order original ``k = 0..n`` then RP ``k = 0..n`` (``reductions[i]`` /
    ``classifiers[i]``).

    Args:
        stages: the branch's stages (modules applied in order), e.g. ResNet-50 ``layer2, layer3, layer4``.
        channels: channels ``C`` of the last stage's output.
        n_stripes: ``n = K_i`` (>= 1).
        rp_stage: index into ``stages`` whose input is partitioned, or None (no RP path).
        reduce_dim: size of each reduced feature (256 in the paper).
        num_classes: identities of the classifiers (0: no classifier).
        abp: use activation balanced pooling for the original path's stripes at evaluation.
        abp_pool: ``"max"`` or ``"avg"`` (see :func:`stripe_pool`).

    Forward: ``[B, C_in, H, W]`` -> ``(feats, logits)``: ``feats`` a list of ``(1 + n) * P`` tensors
    ``[B, reduce_dim]`` (``P = 2`` with RP, else 1), ``logits`` a list of as many ``[B, num_classes]``
    (empty when ``num_classes = 0``).

    Raises:
        ValueError: invalid arguments; (forward) a map with fewer rows than stripes.
    """

    def __init__(self, stages: Sequence[nn.Module], channels: int, n_stripes: int, rp_stage: int | None = None,
                 reduce_dim: int = 256, num_classes: int = 0, abp: bool = True, abp_pool: str = "max"):
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("RMGLBranch needs at least one stage")
        if isinstance(n_stripes, bool) or not isinstance(n_stripes, int) or n_stripes < 1:
            raise ValueError(f"n_stripes must be an integer >= 1, got {n_stripes!r}")
        if rp_stage is not None and not (isinstance(rp_stage, int) and 0 <= rp_stage < len(stages)):
            raise ValueError(f"rp_stage must be None or an index in [0, {len(stages)}), got {rp_stage!r}")
        if abp_pool not in ABP_POOLS:
            raise ValueError(f"abp_pool must be one of {list(ABP_POOLS)}, got {abp_pool!r}")
        self.stages = nn.ModuleList(stages)
        self.n_stripes = n_stripes
        self.rp_stage = rp_stage
        self.abp = bool(abp)
        self.abp_pool = abp_pool
        self.num_paths = 1 if rp_stage is None else 2
        n_feats = (1 + n_stripes) * self.num_paths
        self.reductions = nn.ModuleList(FeatureReduction(channels, reduce_dim) for _ in range(n_feats))
        self.classifiers = nn.ModuleList(
            nn.Linear(reduce_dim, num_classes) for _ in range(n_feats if num_classes > 0 else 0))
        self.feature_dim = n_feats * reduce_dim

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output maps of both paths.

        Returns:
            ``(y, z)``: the original path's map ``[B, C, h, w]`` and the RP path's ``[n, B, C, h', w]``
            (``z[k]`` = the stages after ``rp_stage`` run on stripe ``k``), or None without RP.
        """
        if self.rp_stage is None:
            return self._run(x, 0, len(self.stages)), None
        mid = self._run(x, 0, self.rp_stage)
        y = self._run(mid, self.rp_stage, len(self.stages))
        if self.n_stripes == 1:
            return y, y.unsqueeze(0)
        z = self._run(receptive_partition(mid, self.n_stripes), self.rp_stage, len(self.stages))
        return y, merge_partitions(z, self.n_stripes)

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ``(1 + n) * P`` pooled features ``[B, C]`` before reduction, in the order of ``reductions``."""
        n = self.n_stripes
        y, z = self.paths(x)
        if y.shape[2] < n:
            raise ValueError(f"the branch output has {y.shape[2]} rows, fewer than its {n} stripes; "
                             "use a taller input")
        out = [y.amax(dim=(2, 3))]
        if self.abp and not self.training:
            stripes = stripe_pool(y, abp_boundaries(y, n), self.abp_pool)  # [B, C, n]
        else:
            stripes = equal_stripe_pool(y, n)  # [B, C, n], = F.adaptive_max_pool2d(y, (n, 1))
        out += list(stripes.unbind(dim=2))
        if z is not None:
            per_stripe = z.amax(dim=(3, 4))  # [n, B, C]
            out.append(per_stripe.amax(dim=0))
            out += list(per_stripe.unbind(dim=0))
        return out

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = [red(p) for red, p in zip(self.reductions, self.pooled(x))]
        logits = [cls(f) for cls, f in zip(self.classifiers, feats)]
        return feats, logits

    def extra_repr(self) -> str:
        return (f"n_stripes={self.n_stripes}, rp_stage={self.rp_stage}, abp={self.abp}, "
                f"abp_pool={self.abp_pool!r}")
