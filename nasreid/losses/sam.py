"""Spatial Alignment Module (SAM) of MSINet as a training loss.

Reference: J. Gu, K. Wang, H. Luo, C. Chen, W. Jiang, Y. Fang, S. Zhang, Y. You, J. Zhao, "MSINet: Twins
Contrastive Search of Multi-Scale Interaction for Object ReID", CVPR 2023, Sec. 3.3, Eq. 7-8, Fig. 3,
Table 5 (ablation of the positive / negative terms); the loss weight ``lambda_sa = 2.0`` is in Sec. 4.3.

Notation: ``x`` is the last feature map of the network, ``[B, C, H, W]``, ``N = H * W`` positions
(8 x 4 = 32 at a 128x64 input and stride 16, 16 x 8 = 128 at 256x128); ``x~_i`` is sample ``i``'s map
reshaped to ``[C, N]``.

* "Mutual conv" (Eq. 7), :func:`mutual_correlation`: ``A(i, j) = x~_j^T x~_i`` is the ``[N_j, N_i]``
  matrix of dot products between the positions of ``j`` and of ``i``; ``a(i, j) = max over j's positions``
  is an ``N``-vector, one value per position of ``i`` ("the maximum activation for each position of
  sample i"). The maps are not L2-normalised first (neither in the paper nor in the public code).
* PAM (:class:`PositionActivation`): the learnable "position activation module" of Fig. 3: query / key
  1x1 convolutions (with bias) ``C -> C/8`` of sample ``i``'s own map, ``energy = Q^T K`` ``[N, N]``, and the
  self-activation ``a_hat(i) = max over the key positions`` ``[N]`` (one value per position of ``i``).
* Loss (Eq. 8), :class:`SpatialAlignLoss`, for an anchor ``i`` with positives ``I+`` and negatives ``I-``::

      L_sa(i) = 1/N+ sum_{p in I+} (1 - S(a_hat(i), a(i, p)))
              + 1/N-^2 sum_{n1, n2 in I-} (1 - S(a(i, n1), a(i, n2)))

  ``S`` the cosine similarity; averaged over the anchors of the batch.

What comes from the paper and what from the authors' public code (github.com/vimar-gu/MSINet,
``reid/models/sam.py`` and ``reid/criterion/spatial_align_loss.py``; facts read there, the code here is
our own):

* Paper: Eq. 7, Eq. 8 with cosine similarity, PAM as the positive target, the three terms of Table 5.
* Public code (not stated in the paper):
  - PAM = two biased 1x1 convs ``C -> C // 8`` (as the position attention module of DANet), the max over
    the last dim of ``Q^T K``; no softmax, no value projection. Its convs are initialised like the
    network's (Kaiming normal, ``fan_out``, ReLU gain; zero bias), since there the module lives inside the
    network and gets the network's init.
  - ``I+`` contains the anchor itself (``p = i`` is one of the positives), and the negative sum runs over
    all *ordered* pairs ``(n1, n2)`` of negatives *including* ``n1 = n2`` (those terms are 0), divided by
    ``N-^2`` (the mean of the ``[N-, N-]`` cosine-distance matrix).
  - Nothing is detached: the positive target ``a_hat(i)`` is not detached (PAM is trained only by this
    loss, it has no other supervision), PAM reads the map ``x`` with its gradient, and both ``a(i, p)``
    and ``a_hat(i)`` are pulled towards each other. The same here.
  - ``mode`` ``"pos"``, ``"neg"`` or ``"pos_neg"`` selects the terms (the Table 5 rows); the loss is
    multiplied by ``lambda_sa`` outside (:mod:`nasreid.losses.msinet`).
  - The SAM exists only in training: the evaluated network has none of its parameters. Here PAM's
    parameters belong to the *loss* module, never to the network.
* Index convention (a difference worth knowing): in the public code the correlation vector of the pair
  (anchor ``g``, other ``p``) is indexed by ``p``'s positions (max over the anchor's positions), i.e.
  ``a_code(g, p) = a(p, g)`` in the paper's notation, while PAM's ``a_hat(g)`` is indexed by ``g``'s
  positions. The paper's text ("the maximum activation for each position of sample i") gives vectors
  indexed by the anchor's positions, which is the default here (``positions="anchor"``);
  ``positions="other"`` reproduces the public code's indexing.

Our own choices: the computation runs in float32 with autocast disabled (the correlation of unnormalised
maps and the norms overflow easily in float16); cosine similarities use ``max(||u||, 1e-8)`` in the
denominators (the public code has no epsilon and gives NaN for an all-zero activation vector); a batch need
not be PK-balanced (per-anchor means with masks; the public code reshapes the masked tensors and needs the
same number of positives / negatives for every anchor); anchors without a negative are left out of the
negative term.

Memory: the correlation is materialised as ``[B, B, N, N]`` float32 (and kept for the backward of the
max): 64 x 64 x 32 x 32 x 4 B = 16 MiB at batch 64 and 128x64 inputs, 64 x 64 x 128 x 128 x 4 B = 256 MiB
at 256x128 inputs; both fine on a GPU, grows as ``B^2 N^2``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SAM_MODES", "PositionActivation", "SpatialAlignLoss", "cosine_matrix", "mutual_correlation"]

#: the terms of Eq. 8 (Table 5): positive alignment to PAM, negative pairs aligned with each other, both
SAM_MODES = ("pos_neg", "pos", "neg")

_EPS = 1e-8


def mutual_correlation(x: torch.Tensor) -> torch.Tensor:
    """Correlation activation vectors of every pair in a batch ("Mutual Conv", MSINet Eq. 7).

    Args:
        x: feature maps ``[B, C, H, W]`` (not normalised).

    Returns:
        ``a`` ``[B, B, N]`` (``N = H * W``) with ``a[i, j, n] = max_m <x_i[:, n], x_j[:, m]>``: for every
        position ``n`` of sample ``i`` its strongest dot product with any position of sample ``j``
        (``a[i, j] = a(i, j)`` of Eq. 7). ``a[i, i]`` is included. Same dtype as ``x``.

    Raises:
        ValueError: ``x`` is not 4-D.
    """
    if x.dim() != 4:
        raise ValueError(f"feature map must be [B, C, H, W], got shape {tuple(x.shape)}")
    xt = x.flatten(2)  # [B, C, N]
    corr = torch.einsum("icn,jcm->ijnm", xt, xt)  # [B_i, B_j, N_i, N_j]
    return corr.amax(dim=3)


def cosine_matrix(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched cosine similarities: ``u [..., P, N]``, ``v [..., Q, N]`` -> ``[..., P, Q]``, each norm
    clamped to ``>= 1e-8``."""
    un = u / u.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    vn = v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return un @ vn.transpose(-1, -2)


class PositionActivation(nn.Module):
    """PAM: learnable self-activation of a sample's positions (MSINet Fig. 3, left; layout from the public
    code).

    ``Q = W_q x + b_q``, ``K = W_k x + b_k`` (1x1 convs ``C -> max(C // reduction, 1)``),
    ``energy[n, m] = <Q[:, n], K[:, m]>`` and ``a_hat[n] = max_m energy[n, m]``.

    Args:
        in_channels: channels ``C`` of the feature map.
        reduction: channel reduction of the query / key projections (8 in the public code).

    Forward:
        x: ``[B, C, H, W]``.
        returns: ``a_hat`` ``[B, N]`` (one value per position of each sample).

    Raises:
        ValueError: ``in_channels`` or ``reduction`` < 1; wrong input channel count (in forward).
    """

    def __init__(self, in_channels: int, reduction: int = 8):
        super().__init__()
        if in_channels < 1 or reduction < 1:
            raise ValueError(f"in_channels and reduction must be >= 1, got {in_channels}, {reduction}")
        self.in_channels = int(in_channels)
        mid = max(self.in_channels // reduction, 1)
        self.query = nn.Conv2d(self.in_channels, mid, kernel_size=1, bias=True)
        self.key = nn.Conv2d(self.in_channels, mid, kernel_size=1, bias=True)
        for conv in (self.query, self.key):  # the init the authors' network applies to every conv
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            assert conv.bias is not None  # built with bias=True
            nn.init.zeros_(conv.bias)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, N, N]``, ``energy[b, n, m] = <Q_b[:, n], K_b[:, m]>``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PAM expects a feature map [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        q = self.query(x).flatten(2)  # [B, C', N]
        k = self.key(x).flatten(2)
        return q.transpose(1, 2) @ k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x).amax(dim=2)


class SpatialAlignLoss(nn.Module):
    """Spatial alignment loss of MSINet (Sec. 3.3, Eq. 8) with its PAM (see the module docstring for what
    comes from the paper and what from the public code).

    Args:
        in_channels: channels ``C`` of the feature map; needed for PAM (modes with ``"pos"``), ignored and
            may be None for ``mode="neg"``.
        mode: ``"pos_neg"`` (Eq. 8), ``"pos"`` (positive term only) or ``"neg"`` (negative term only);
            ``"neg"`` builds no PAM, so the loss then has no parameter.
        reduction: PAM's channel reduction (8).
        positions: ``"anchor"`` (the paper's text: vectors indexed by the anchor's positions) or
            ``"other"`` (the public code's indexing: ``a(j, i)`` for the pair ``(i, j)``).

    Forward:
        featmap: ``[B, C, H, W]`` last feature map (float; computed in float32 with autocast off).
        pids: ``[B]`` integer identity labels.
        returns: scalar loss (positive term + negative term, each a mean over anchors), in ``[0, 4]``.

    Raises:
        ValueError: bad arguments, wrong shapes, a channel count that does not match PAM.
    """

    def __init__(self, in_channels: int | None = None, mode: str = "pos_neg", reduction: int = 8,
                 positions: str = "anchor"):
        super().__init__()
        if mode not in SAM_MODES:
            raise ValueError(f"unknown SAM mode {mode!r}; expected one of {list(SAM_MODES)}")
        if positions not in ("anchor", "other"):
            raise ValueError(f"positions must be 'anchor' or 'other', got {positions!r}")
        self.mode = mode
        self.positions = positions
        self.use_pos = "pos" in mode
        self.use_neg = "neg" in mode
        if self.use_pos:
            if in_channels is None:
                raise ValueError(f"SAM mode {mode!r} needs in_channels (the channel count C of the feature map) "
                                 "to build its position activation module (PAM)")
            self.pam: PositionActivation | None = PositionActivation(in_channels, reduction)
        else:
            self.pam = None

    def forward(self, featmap: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if featmap.dim() != 4:
            raise ValueError(f"featmap must be [B, C, H, W], got shape {tuple(featmap.shape)}")
        if pids.dim() != 1 or pids.shape[0] != featmap.shape[0]:
            raise ValueError(f"pids must be [B={featmap.shape[0]}], got shape {tuple(pids.shape)}")
        with torch.autocast(device_type=featmap.device.type, enabled=False):
            x = featmap.float()
            a = mutual_correlation(x)  # [B_i, B_j, N], indexed by i's positions
            if self.positions == "other":
                a = a.transpose(0, 1)
            same = pids.view(-1, 1) == pids.view(1, -1)  # [B, B], diagonal included
            total = x.new_zeros(())
            if self.use_pos:
                assert self.pam is not None  # built when use_pos
                a_hat = self.pam(x)  # [B, N]
                cos_pos = cosine_matrix(a_hat.unsqueeze(1), a).squeeze(1)  # [B, B]: S(a_hat(i), a(i, j))
                pos = same.to(x.dtype)
                total = total + ((1.0 - cos_pos) * pos).sum(1).div(pos.sum(1)).mean()
            if self.use_neg:
                neg = (~same).to(x.dtype)  # [B, B]
                n_neg = neg.sum(1)  # [B]
                cos_nn = cosine_matrix(a, a)  # [B, B, B]: S(a(i, j1), a(i, j2))
                pair = neg.unsqueeze(2) * neg.unsqueeze(1)  # [B, B, B] both negatives of anchor i
                valid = n_neg > 0
                if bool(valid.any()):
                    per_anchor = ((1.0 - cos_nn) * pair).sum((1, 2))[valid] / n_neg[valid].pow(2)
                    total = total + per_anchor.mean()
                else:  # one identity in the batch: no negative pair; a zero that keeps the graph
                    total = total + 0.0 * cos_nn.sum()
        return total

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, positions={self.positions!r}"
