"""Training method ``domainmix``: generalisable re-ID from labelled synthetic data A and unlabelled real data B.

Paper: Wang, Liao, Zhao, Kang & Shao, "DomainMix: Learning Generalizable Person Re-Identification Without Human
Annotations", BMVC 2021 (Sec. 3, Algorithm 1, Sec. 4.2, Table 1). Any fixed network whose training output is
``dict(feat, [feat_bn,] logits)`` (a :class:`~nasreid.models.heads.ReIDHead`: OSNet-AIN, MSINet) can be
retrained with it::

    data: {dataset: {name: synthetic, kwargs: {num_ids: 1200, num_cams: 6, camera_style: 1.0}}}   # A, labelled
    training:
      method: domainmix
      kwargs:
        unlabelled: {name: cuhk01, root: cuhk01, kwargs: {split_seed: 0}}   # B: its labels are never read
        stage2_epochs: 20                # then stage 3 until optim.epochs
        dm_loss: db                      # Eq. 8 ("kl": Eq. 6)
        alternate: epoch                 # Algorithm 1; "iteration": the public code's every-10th-step update
        cluster: {k1: 30, k2: 6, eps: 0.6, min_samples: 4, b_l: 5, b_h: 120, every: 1}
    eval: {targets: [{name: cuhk03np, root: cuhk03}]}                          # C, never seen

Epochs ``0 .. optim.epochs-1`` (one learning-rate schedule over all of them) fall into stages:

* ``source`` (the first ``source_epochs``): A alone with Eq. 4. The backbone that stage 1 clusters B with must
  know something about people; the paper takes its labels from a SpCL model adapted from A to B (Sec. 4.2), this
  warm start plays that part (0 is allowed).
* **stage 1** (before every mixed epoch whose index since the first mixed epoch is a multiple of
  ``cluster.every``): features of B (eval mode, test transform) -> k-reciprocal Jaccard distance (``k1``, ``k2``;
  :func:`~nasreid.evaluation.rerank.jaccard_distance`, sparse: only pairs within ``eps`` are stored) -> DBSCAN
  (scikit-learn, ``metric="precomputed"``, ``eps``, ``min_samples``) -> refinement, Eq. 1: clusters with fewer
  than ``b_l`` or more than ``b_h`` images are dropped with DBSCAN's outliers. The identity classifier is rebuilt
  for ``|A| + |B'|`` classes: A's rows are kept, B''s rows start at the L2-normalised cluster centroids scaled to
  the mean norm of A's rows (SpCL's centroid initialisation); the optimiser state of the classifier is reset.
* **stage 2** (the next ``stage2_epochs``): PK batches over A ∪ B' (identities of both domains mixed in a
  batch, Sec. 4.2), ``L1 = lambda_s1 * L_id + L_tri`` (Eq. 2-4).
* **stage 3** (the remaining epochs), Algorithm 1 with ``adversarial`` on: stage-3 epoch ``n = 1, 2, ...``:
  odd ``n`` trains the backbone with ``L2 = lambda_m * L_dm + lambda_s2 * L_id + L_tri`` (Eq. 11) and the
  discriminator frozen; even ``n`` trains the domain discriminator (Fig. 5, an MLP at ``disc_lr_mult`` times the
  learning rate) with the CE of Eq. 5 on features of the backbone in eval mode and without gradient (its
  parameters and BN statistics do not change). ``alternate: iteration`` is the public code's schedule instead:
  every step trains the backbone (Eq. 11, discriminator frozen) and every ``disc_every``-th step then also the
  discriminator on that step's detached features. ``L_dm`` is the symmetrised KL divergence to the uniform
  distribution (Eq. 6-7, ``dm_loss: kl``) or the domain balance (Eq. 8, ``dm_loss: db``). The discriminator sees
  the test-time embedding (``feat_bn`` of a BNNeck head, else ``feat``).

Baselines on the same code path and budget: ``adversarial: false`` is **DirectMix** (Table 1: no discriminator,
no ``L_dm``); ``unlabelled: null`` is **A only**; ``b_labels: true`` replaces the pseudo labels by B's true
identities (Table 1's "labeled" rows, an upper bound). ``steps_per_epoch`` fixes the steps of every epoch (the
paper's iterations per epoch), so arms with different amounts of data get the same number of updates.

What is checkpointed (resume continues the alternation where it stopped): the network with its current
classifier size, both optimisers and schedules (slots ``main`` and ``discriminator``), the discriminator, the
current pseudo labels of B and the clustering log. B's true identities are read only when ``b_labels`` is true
or for the *report* of cluster purity (``purity``); the records the trainer sees carry ``pid = -1`` until
stage 1 labels them. Logged per epoch (``metrics.json`` history, TensorBoard ``epoch/...``): ``clusters``,
``b_kept``, ``b_dropped`` (refinement), ``b_noise`` (DBSCAN outliers), ``purity``, ``ari``, ``disc_acc``,
``l_dm``; ``pseudo_labels.csv`` and ``pseudo_labels.png`` plot cluster count and purity over epochs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from nasreid.config import DatasetRef, RecipeError, loader_workers
from nasreid.engine.trainer import Hook, backward, optimizer_step
from nasreid.models.interface import classifiers_of
from nasreid.registry import METHODS

from .base import COMMON_KEYS, TrainingMethod, reid_loss_setting

__all__ = ["DomainMixMethod", "DomainDiscriminator", "ClusterConfig", "domainmix_loss", "refine_clusters",
           "cluster_pseudo_labels", "cluster_purity", "MixedSource", "StepsPerEpoch", "stage_of"]

log = logging.getLogger("nasreid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClusterConfig(_Strict):
    """Stage 1 settings (``training.kwargs.cluster``): SpCL / DomainMix public code k1 30, k2 6, eps 0.6,
    min_samples 4; refinement bounds of Eq. 1 (paper 5 and 120); re-clustered every ``every`` mixed epochs."""

    k1: int = Field(30, ge=1)
    k2: int = Field(6, ge=1)
    eps: float = Field(0.6, gt=0, lt=1)
    min_samples: int = Field(4, ge=1)
    b_l: int = Field(5, ge=1, description="Eq. 1 lower bound: clusters with fewer images are dropped")
    b_h: int = Field(120, ge=1, description="Eq. 1 upper bound: clusters with more images are dropped")
    every: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1, description="feature extraction batch")


# ------------------------------------------------------------------------------------------------ stage 1
def refine_clusters(labels: Sequence[int], b_l: int, b_h: int) -> tuple[np.ndarray, dict[str, int]]:
    """Pseudo-label refinement, DomainMix Eq. 1: keep the labels ``l`` with ``b_l <= S(l) <= b_h`` images.

    Args:
        labels: ``[N]`` cluster index per image, ``-1`` for DBSCAN outliers.
        b_l, b_h: bounds on the number of images of a kept cluster (inclusive).

    Returns:
        ``(refined [N] int64, stats)``: kept clusters relabelled ``0..M-1`` in order of first appearance, every
        other image ``-1``; ``stats`` = ``clusters`` (M), ``clusters_before``, ``largest`` (images in the largest
        cluster before refinement), ``kept`` (images), ``dropped``
        (images of clusters out of bounds), ``noise`` (outliers), ``too_small``, ``too_large`` (clusters).

    Raises:
        ValueError: ``b_l > b_h`` or a label below -1.
    """
    if b_l > b_h:
        raise ValueError(f"refinement bounds: b_l={b_l} must not exceed b_h={b_h}")
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if lab.size and lab.min() < -1:
        raise ValueError(f"cluster labels must be >= -1 (-1: outlier), got {int(lab.min())}")
    sizes = Counter(int(x) for x in lab if x >= 0)
    keep = {c for c, s in sizes.items() if b_l <= s <= b_h}
    out = np.full(lab.shape, -1, dtype=np.int64)
    mapping: dict[int, int] = {}
    for i, c_raw in enumerate(lab):
        c = int(c_raw)
        if c in keep:
            if c not in mapping:
                mapping[c] = len(mapping)
            out[i] = mapping[c]
    stats = {"clusters": len(keep), "clusters_before": len(sizes), "largest": max(sizes.values(), default=0),
             "kept": int((out >= 0).sum()),
             "dropped": int(sum(s for c, s in sizes.items() if c not in keep)), "noise": int((lab < 0).sum()),
             "too_small": sum(1 for s in sizes.values() if s < b_l),
             "too_large": sum(1 for s in sizes.values() if s > b_h)}
    return out, stats


def cluster_pseudo_labels(features: torch.Tensor, cfg: ClusterConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Stage 1 on features ``[N, D]``: k-reciprocal Jaccard distance (sparse, pairs within ``eps`` stored),
    DBSCAN (``metric="precomputed"``), refinement (Eq. 1).

    Returns:
        ``(labels [N] int64 in -1..M-1, stats)`` (see :func:`refine_clusters`, plus ``seconds``).
    """
    from sklearn.cluster import DBSCAN

    from nasreid.evaluation.rerank import jaccard_distance

    t0 = time.time()
    n = int(features.shape[0])
    k1 = min(cfg.k1, n - 1)
    dist = jaccard_distance(features.float(), k1=max(k1, 1), k2=min(cfg.k2, max(k1, 1)), max_distance=cfg.eps)
    raw = DBSCAN(eps=cfg.eps, min_samples=cfg.min_samples, metric="precomputed", n_jobs=1).fit_predict(dist)
    labels, counts = refine_clusters(raw, cfg.b_l, cfg.b_h)
    stats: dict[str, Any] = counts
    stats["seconds"] = time.time() - t0
    return labels, stats


def cluster_purity(pseudo: Sequence[int] | np.ndarray, true: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Quality of pseudo labels against true identities -- for the report only, never for training.

    ``purity``: share of the clustered images (``pseudo >= 0``) whose true identity is their cluster's majority
    identity; ``ari``: adjusted Rand index over the clustered images (scikit-learn); ``coverage``: share of images
    clustered. NaN where no image is clustered.
    """
    from sklearn.metrics import adjusted_rand_score

    p, t = np.asarray(pseudo), np.asarray(true)
    m = p >= 0
    if not m.any():
        return {"purity": float("nan"), "ari": float("nan"), "coverage": 0.0}
    major = 0
    for c in np.unique(p[m]):
        major += Counter(t[p == c].tolist()).most_common(1)[0][1]
    return {"purity": major / int(m.sum()), "ari": float(adjusted_rand_score(t[m], p[m])),
            "coverage": float(m.mean())}


# ------------------------------------------------------------------------------------- discriminator, L_dm
class DomainDiscriminator(nn.Module):
    """Domain discriminator C_d of DomainMix (Fig. 5: fully connected layers with non-linearities).

    ``Linear -> BN1d -> ReLU`` per hidden width, then ``Linear`` to ``num_domains`` logits.

    Args:
        in_dim: embedding size D.
        hidden: hidden widths (paper figure: several FC layers; default ``(256, 256)`` for D = 512).
        num_domains: n (2: synthetic and real).

    Forward: ``[B, D] -> [B, n]`` logits.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 256), num_domains: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        d = int(in_dim)
        for h in hidden:
            layers += [nn.Linear(d, int(h)), nn.BatchNorm1d(int(h)), nn.ReLU(inplace=True)]
            d = int(h)
        layers.append(nn.Linear(d, int(num_domains)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def domainmix_loss(logits: torch.Tensor, kind: str = "db") -> torch.Tensor:
    """DomainMix loss L_dm on discriminator logits ``[B, n]`` (scalar, mean over the batch, nats).

    * ``"kl"``: symmetrised KL divergence to the uniform ``h = (1/n, ..., 1/n)`` (Eq. 6-7):
      ``D_kl(p || h) + D_kl(h || p)``; minimum 0 at ``p = h``.
    * ``"db"``: domain balance (Eq. 8): ``sum_j (p_j log p_j + 0.5)``, convex (Eq. 9-10); minimum
      ``-log n + n/2`` at ``p = h``.

    ``p = softmax(logits)`` in float32. Raises ValueError for another ``kind``.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    n = logits.shape[1]
    if kind == "kl":
        logh = -math.log(n)
        kl_ph = (p * (logp - logh)).sum(1)
        kl_hp = ((1.0 / n) * (logh - logp)).sum(1)
        return (kl_ph + kl_hp).mean()
    if kind == "db":
        return (p * logp + 0.5).sum(1).mean()
    raise ValueError(f"unknown DomainMix loss {kind!r}; expected 'kl' (Eq. 6) or 'db' (Eq. 8)")


# ---------------------------------------------------------------------------------------------- data
class MixedSource:
    """Training records of several domains with one image reader each (picklable for loader workers).

    ``train`` holds records whose ``dsetid`` picks the reader (0: A, 1: B); :meth:`read_image` dispatches.
    """

    def __init__(self, readers: dict[int, Any], train: Sequence):
        self.readers = dict(readers)
        self.train = list(train)
        self.name = "mixed"

    def read_image(self, record):
        return self.readers[record.dsetid].read_image(record)


class StepsPerEpoch:
    """A training loader that yields exactly ``steps`` batches per epoch, cycling through passes of ``loader``.

    Pass ``k`` of epoch ``e`` uses the PK order of sampler epoch ``e * 1000 + k``, so an epoch is a function of
    ``(seed, e)`` only (exact resume). :func:`~nasreid.engine.trainer.reseed_loader` reaches it through
    :meth:`set_epoch` and :attr:`generator`.
    """

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self.epoch = loader, int(steps), 0
        self.sampler = self

    @property
    def generator(self):
        return getattr(self.loader, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done, k = 0, 0
        while done < self.steps:
            self.loader.sampler.set_epoch(self.epoch * 1000 + k)
            got = False
            for batch in self.loader:
                got = True
                yield batch
                done += 1
                if done >= self.steps:
                    return
            if not got:
                return
            k += 1


def stage_of(epoch: int, source_epochs: int, stage2_epochs: int, has_b: bool) -> tuple[str, int]:
    """``(stage, n)`` of a 0-based epoch: ``"source"`` (A only), ``"stage2"`` or ``"stage3"`` with ``n`` the
    1-based stage-3 epoch (Algorithm 1's counter; 0 otherwise). Without B every epoch is ``"source"``."""
    if not has_b or epoch < source_epochs:
        return "source", 0
    if epoch < source_epochs + stage2_epochs:
        return "stage2", 0
    return "stage3", epoch - source_epochs - stage2_epochs + 1


# ---------------------------------------------------------------------------------------------- classifier
def _resize_on_load(module: nn.Linear):
    """A load_state_dict pre-hook: a classifier checkpointed with another number of classes is resized first."""

    def hook(_module, state_dict, prefix, *args, **kwargs):  # nn.Module.register_load_state_dict_pre_hook
        w = state_dict.get(prefix + "weight")
        if w is not None and w.shape != module.weight.shape:
            module.weight.data = torch.empty_like(w, device=module.weight.device, dtype=module.weight.dtype)
            module.out_features = int(w.shape[0])
            b = state_dict.get(prefix + "bias")
            if module.bias is not None and b is not None:
                module.bias.data = torch.empty_like(b, device=module.bias.device, dtype=module.bias.dtype)

    return hook


class _DomainMixState(Hook):
    """Checkpointed state of a DomainMix run: B's pseudo labels and the clustering log (see the method)."""

    name = "domainmix"

    def __init__(self, method: "DomainMixMethod"):
        self.m = method

    def state_dict(self) -> dict[str, Any]:
        m = self.m
        return {"labels": None if m.b_pseudo is None else m.b_pseudo.tolist(), "labels_epoch": m.labels_epoch,
                "cluster_log": m.cluster_log}

    def load_state_dict(self, state) -> None:
        m = self.m
        m.b_pseudo = None if state.get("labels") is None else np.asarray(state["labels"], dtype=np.int64)
        m.labels_epoch = state.get("labels_epoch")
        m.cluster_log = list(state.get("cluster_log", []))

    def before_epoch(self, trainer) -> None:
        self.m.before_epoch(trainer)

    def after_train(self, trainer) -> None:
        self.m.write_report(trainer)


@METHODS.register("domainmix")
class DomainMixMethod(TrainingMethod):
    """DomainMix training (see the module docstring for stages, losses and what is checkpointed).

    ``training.kwargs`` (:class:`DomainMixMethod.Config`):
        unlabelled: dataset B (``{name, root, kwargs}`` as a recipe ``DatasetRef``); its train split is used
            without labels. ``None``: A only.
        b_labels: use B's true identities instead of pseudo labels (upper-bound baseline).
        source_epochs: epochs on A alone before B is first clustered.
        stage2_epochs: epochs of stage 2 (Eq. 4) after them; the rest of ``optim.epochs`` is stage 3.
        adversarial: stage 3 with discriminator and L_dm (DomainMix); ``False``: DirectMix.
        dm_loss: ``"db"`` (Eq. 8, the paper's choice after Table 1) or ``"kl"`` (Eq. 6).
        alternate: ``"epoch"`` (Algorithm 1) or ``"iteration"`` (public code: discriminator every
            ``disc_every`` steps).
        lambda_s1, lambda_s2, lambda_m: weights of Eq. 4 and Eq. 11 (paper 10, 10, 1).
        disc_lr_mult: discriminator lr over ``optim.lr`` (paper 100); same optimiser type and schedule.
        disc_hidden: hidden widths of the discriminator MLP.
        steps_per_epoch: fixed steps per epoch (``None``: one pass over the PK order of the epoch's records).
        cluster: :class:`ClusterConfig` fields.
        purity: compute cluster purity / ARI against B's true labels for the report.

    Common recipe keys: honours ``optim.*`` (``lr_mult`` splits the network's parameters; the discriminator
    has its own optimiser at ``disc_lr_mult``), ``training.freeze_backbone_epochs`` / ``open_layers`` (the
    discriminator always trains), ``model.pretrained``, ``loss.label_smooth`` and ``loss.triplet_margin`` (the
    ID and triplet terms of Eq. 4 / 11, under ``loss.kwargs``); refuses ``loss.name``, ``loss.kwargs.triplet_weight``
    and any other ``loss.kwargs``
    (the loss is Eq. 4 / 11, the triplet weight is 1 there).

    Raises:
        RecipeError: a bad value (names ``training.kwargs.<key>``), a network without an identity classifier,
            a run under torchrun.
    """

    class Config(TrainingMethod.Config):
        unlabelled: Optional[DatasetRef] = None
        b_labels: bool = False
        source_epochs: int = Field(0, ge=0)
        stage2_epochs: int = Field(20, ge=0)
        adversarial: bool = True
        dm_loss: Literal["db", "kl"] = Field("db", description="'db' (Eq. 8) or 'kl' (Eq. 6)")
        alternate: Literal["epoch", "iteration"] = "epoch"
        disc_every: int = Field(10, ge=1)
        lambda_s1: float = Field(10.0, ge=0, allow_inf_nan=False)
        lambda_s2: float = Field(10.0, ge=0, allow_inf_nan=False)
        lambda_m: float = Field(1.0, ge=0, allow_inf_nan=False)
        disc_lr_mult: float = Field(100.0, ge=0, allow_inf_nan=False)
        disc_hidden: tuple[int, ...] = (256, 256)
        steps_per_epoch: Optional[int] = Field(None, ge=1)
        cluster: ClusterConfig = Field(default_factory=ClusterConfig)
        purity: bool = True

        @model_validator(mode="after")
        def _consistent(self):
            if self.cluster.b_l > self.cluster.b_h:
                raise ValueError(f"cluster: b_l={self.cluster.b_l} exceeds b_h={self.cluster.b_h} (Eq. 1)")
            if self.b_labels and self.unlabelled is None:
                raise ValueError("b_labels: true needs an unlabelled dataset B (training.kwargs.unlabelled)")
            return self

    cfg: Config  # the validated ``training.kwargs`` (set by TrainingMethod.__init__)
    # B, set by setup(): the dataset, its records with labels hidden, its true identities (None: not read)
    b_dataset: Any
    b_records: Optional[list]
    b_true: Optional[list[int]]

    honours = frozenset(COMMON_KEYS) - {"loss.name", "loss.kwargs", "loss.kwargs.triplet_weight"}
    distributed = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        c = self.cfg
        self.b_ref, self.cluster = c.unlabelled, c.cluster
        self.b_labels, self.source_epochs, self.stage2_epochs = c.b_labels, c.source_epochs, c.stage2_epochs
        self.adversarial, self.dm_loss, self.alternate = c.adversarial, c.dm_loss, c.alternate
        self.disc_every = c.disc_every
        self.lambda_s1, self.lambda_s2, self.lambda_m = c.lambda_s1, c.lambda_s2, c.lambda_m
        self.disc_lr_mult, self.disc_hidden = c.disc_lr_mult, tuple(c.disc_hidden)
        self.steps_per_epoch = c.steps_per_epoch
        self.purity = c.purity
        # run state
        self.b_pseudo: Optional[np.ndarray] = None
        self.labels_epoch: Optional[int] = None
        self.cluster_log: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------- setup
    def _load_b(self, ctx):
        """B's train records with labels hidden (``pid=-1``, ``dsetid=1``) and, only where allowed, the true
        identities (``b_labels`` or the purity report)."""
        from nasreid.config import resolve_data_root
        from nasreid.data import build_dataset

        ref = self.b_ref
        try:
            ds = build_dataset(ref.name, resolve_data_root(ref.root), **ref.kwargs)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"training.kwargs.unlabelled: cannot build dataset {ref.name!r}: {e}") from e
        if not ds.train:
            raise RecipeError(f"training.kwargs.unlabelled: the train split of {ref.name!r} is empty")
        true = [r.pid for r in ds.train] if (self.b_labels or self.purity) else None
        hidden = [dataclasses.replace(r, pid=-1, dsetid=1) for r in ds.train]
        return ds, hidden, true

    def _records(self):
        """The training records of the current epoch: A (pids 0..nA-1, dsetid 0) and, in mixed stages, B'."""
        a = [dataclasses.replace(r, dsetid=0) for r in self.a_records]
        if self.stage == "source" or self.b_records is None:
            return a
        lab = self.b_pseudo
        b = [dataclasses.replace(r, pid=self.num_a + int(p)) for r, p in zip(self.b_records, lab) if p >= 0]
        return a + b

    def _loader(self, records):
        from nasreid.data import build_train_loader

        ctx = self.ctx
        d = ctx.recipe.data
        src = MixedSource({0: ctx.dataset, 1: self.b_dataset if self.b_dataset is not None else ctx.dataset},
                          records)
        loader = build_train_loader(src, height=d.height, width=d.width, batch_size=d.batch_size,
                                    num_instances=d.num_instances, workers=loader_workers(ctx.recipe),
                                    seed=ctx.recipe.seed,
                                    on_corrupt=d.on_corrupt, persistent_workers=False, **d.augment.model_dump())
        return StepsPerEpoch(loader, self.steps_per_epoch) if self.steps_per_epoch else loader

    # ---------------------------------------------------------------------------------------- stage 1
    def _b_features(self) -> torch.Tensor:
        from nasreid.evaluation.features import extract_features

        ctx = self.ctx
        loader = ctx.feature_loader(self.b_records, batch_size=self.cluster.batch_size)
        loader.dataset.reader = self.b_dataset.read_image
        f, _, _, _ = extract_features(self.model, loader, device=ctx.device.device, amp=ctx.device.amp,
                                      channels_last=ctx.device.channels_last, progress=ctx.progress,
                                      desc="stage 1: features of B")
        return f

    def _relabel_b(self, epoch: int) -> dict[str, Any]:
        """Stage 1: new labels of B (clustering, or the true identities with ``b_labels``), classifier rebuilt."""
        t0 = time.time()
        feats = None
        feats = self._b_features()  # also the centroids that B's classifier rows start from
        if self.b_labels:  # upper-bound baseline: B's true identities, relabelled 0..M-1
            assert self.b_true is not None  # setup() reads them with b_labels (the Config needs B for it)
            uniq = {p: i for i, p in enumerate(sorted(set(self.b_true)))}
            labels = np.asarray([uniq[p] for p in self.b_true], dtype=np.int64)
            stats = {"clusters": len(uniq), "kept": len(labels), "dropped": 0, "noise": 0}
        else:
            labels, stats = cluster_pseudo_labels(feats, self.cluster)
        if stats["clusters"] == 0:
            log.warning("stage 1 (epoch %d): no cluster of B survived DBSCAN + refinement (eps %.2f, min_samples "
                        "%d, b_l %d, b_h %d): this epoch trains on A alone", epoch + 1, self.cluster.eps,
                        self.cluster.min_samples, self.cluster.b_l, self.cluster.b_h)
        self.b_pseudo, self.labels_epoch = labels, epoch
        self._rebuild_classifier(labels, feats)
        row = {"epoch": epoch, "clusters": int(stats["clusters"]), "largest_cluster": int(stats.get("largest", 0)),
               "b_kept": int(stats["kept"]),
               "b_dropped": int(stats["dropped"]), "b_noise": int(stats["noise"]),
               "cluster_seconds": time.time() - t0}
        if self.purity and self.b_true is not None:  # the report's view; training never reads it
            q = cluster_purity(labels, self.b_true)
            row.update(purity=q["purity"], ari=q["ari"], coverage=q["coverage"])
        self.cluster_log.append(row)
        log.info("stage 1 (epoch %d): %d clusters, %d images kept, %d dropped by Eq. 1 (largest cluster %d), %d "
                 "outliers%s", epoch + 1, row["clusters"], row["b_kept"], row["b_dropped"], row["largest_cluster"],
                 row["b_noise"],
                 f", purity {row['purity']:.3f}" if "purity" in row and row["purity"] == row["purity"] else "")
        return row

    def _rebuild_classifier(self, labels: np.ndarray, feats: Optional[torch.Tensor]) -> None:
        """Classifier(s) for ``num_a + M`` classes (:meth:`~nasreid.models.interface.ReIDNetwork.reset_classifier`,
        in place): A's rows kept, B's rows from the L2-normalised cluster centroids scaled to the mean norm of A's
        rows (SpCL's centroid initialisation); the optimiser state of the classifiers is dropped."""
        m = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0

        def centroids(_name: str, clf: nn.Linear, n_new: int) -> torch.Tensor:
            w_a = clf.weight.data[: self.num_a]
            scale = w_a.norm(dim=1).mean().clamp_min(1e-6)
            rows = torch.zeros(n_new, w_a.shape[1], dtype=w_a.dtype, device=w_a.device)
            if n_new and feats is not None:
                f = feats.to(w_a.device, w_a.dtype)
                if f.shape[1] != w_a.shape[1]:  # e.g. MSINet's local head: small random rows instead
                    rows.normal_(0, float(scale) / math.sqrt(w_a.shape[1]))
                else:
                    lab = torch.as_tensor(labels, device=w_a.device)
                    keep = lab >= 0
                    rows.index_add_(0, lab[keep], f[keep])
                    rows = F.normalize(rows, dim=1) * scale
            return rows

        for clf in self.model.reset_classifier(self.num_a + m, keep=self.num_a, init=centroids).values():
            self.optimizer.state.pop(clf.weight, None)
            if clf.bias is not None:
                self.optimizer.state.pop(clf.bias, None)

    def before_epoch(self, trainer) -> None:
        epoch = trainer.epoch
        self.stage, self.n3 = stage_of(epoch, self.source_epochs, self.stage2_epochs, self.b_records is not None)
        first_mix = self.source_epochs
        self.disc_epoch = self.stage == "stage3" and self.adversarial and self.alternate == "epoch" \
            and self.n3 % 2 == 0
        if self.stage != "source":
            due = (epoch - first_mix) % self.cluster.every == 0
            # the backbone does not change in a discriminator epoch: its labels are those of the epoch before
            if self.b_pseudo is None or (due and not self.disc_epoch and self.labels_epoch != epoch
                                         and not self.b_labels) \
                    or (self.b_labels and self.labels_epoch is None):
                row = self._relabel_b(epoch)
                trainer.log(**{k: v for k, v in row.items() if k not in ("epoch",)})
            elif self.cluster_log:
                last = self.cluster_log[-1]
                trainer.log(**{k: v for k, v in last.items() if k not in ("epoch", "cluster_seconds")})
        trainer.loader = self._loader(self._records())
        trainer.log(stage={"source": 0, "stage2": 2, "stage3": 3}[self.stage], disc_epoch=int(self.disc_epoch))

    # ---------------------------------------------------------------------------------------- steps
    def id_triplet(self, out: dict, pids: torch.Tensor, lambda_id: float) -> tuple[torch.Tensor, dict]:
        """``lambda_id * L_id + L_tri`` (Eq. 4 / the last two terms of Eq. 11) and its parts."""
        logits = out["logits"].float()
        ce = F.cross_entropy(logits, pids, label_smoothing=float(reid_loss_setting(self.ctx.recipe, "label_smooth")))
        tri = self.triplet(out["feat"].float(), pids)
        with torch.no_grad():
            acc = float((logits.argmax(1) == pids).float().mean())
        return lambda_id * ce + tri, {"ce": float(ce.detach()), "triplet": float(tri.detach()), "acc": acc}

    @staticmethod
    def embedding(out: dict) -> torch.Tensor:
        """The test-time embedding of a training output (``feat_bn`` of a BNNeck head, else ``feat``)."""
        return out["feat_bn"] if "feat_bn" in out else out["feat"]

    def backbone_update(self, batch: dict) -> tuple[dict, dict]:
        """One backbone step (Eq. 4 before stage 3 / DirectMix, Eq. 11 in adversarial stage 3) with the
        discriminator frozen (``requires_grad`` off: it gets no gradient and does not move). Returns the
        network's outputs and the step's scalars."""
        tr = self.trainer
        model, opt = self.model, self.optimizer
        opt.zero_grad(set_to_none=True)
        adv = self.stage == "stage3" and self.adversarial
        pids = batch["pid"]
        with tr.ctx.autocast():
            out = model(batch["img"])
        lam = self.lambda_s2 if self.stage == "stage3" else self.lambda_s1
        loss, parts = self.id_triplet(out, pids, lam)
        if adv:
            self.disc.requires_grad_(False)
            self.disc.eval()  # frozen: BN statistics of the discriminator do not move either
            try:
                with tr.ctx.autocast():
                    d_logits = self.disc(self.embedding(out))
                l_dm = domainmix_loss(d_logits, self.dm_loss)
                loss = loss + self.lambda_m * l_dm
                dom = batch["dsetid"].long()
                with torch.no_grad():
                    parts["l_dm"] = float(l_dm.detach())
                    parts["disc_acc"] = float((d_logits.argmax(1) == dom).float().mean())
            finally:
                self.disc.requires_grad_(True)
        parts["loss"] = float(loss.detach())
        backward(loss, tr.ctx.scaler, parts)
        optimizer_step(opt, [p for p in model.parameters() if p.requires_grad], tr.ctx.scaler,
                       self.ctx.recipe.optim.grad_clip)
        return out, parts

    def discriminator_update(self, features: torch.Tensor, domains: torch.Tensor) -> dict[str, float]:
        """One discriminator step (Eq. 5) on backbone features ``[B, D]`` taken without gradient (the backbone
        is fixed). Returns ``disc_loss`` and ``disc_acc``."""
        tr = self.trainer
        self.disc.train()
        self.disc_opt.zero_grad(set_to_none=True)
        with tr.ctx.autocast():
            logits = self.disc(features.detach())
        loss = F.cross_entropy(logits.float(), domains.long())
        parts = {"disc_loss": float(loss.detach())}
        backward(loss, tr.ctx.scaler, parts)
        optimizer_step(self.disc_opt, list(self.disc.parameters()), tr.ctx.scaler, None)
        with torch.no_grad():
            parts["disc_acc"] = float((logits.argmax(1) == domains).float().mean())
        return parts

    def step(self, trainer, batch: dict) -> dict[str, float]:
        if self.disc_epoch:  # Algorithm 1, even stage-3 epoch: discriminator only, backbone fixed
            was = self.model.training
            self.model.eval()
            with torch.no_grad(), trainer.ctx.autocast():
                f = self.model(batch["img"])
            self.model.train(was)
            parts = self.discriminator_update(f.float(), batch["dsetid"])
            parts["loss"] = parts["disc_loss"]
            return parts
        out, parts = self.backbone_update(batch)
        if self.stage == "stage3" and self.adversarial and self.alternate == "iteration" \
                and (trainer.step + 1) % self.disc_every == 0:
            d = self.discriminator_update(self.embedding(out).detach().float(), batch["dsetid"])
            parts["disc_loss"] = d["disc_loss"]
        return parts

    # ---------------------------------------------------------------------------------------- fit
    def setup(self, records: Sequence) -> None:
        """A's records (``dsetid`` 0), the classifiers (resized on load, for resume), B's records without labels."""
        ctx, net = self.ctx, self.model
        # the discriminator's schedule steps every epoch, also in epochs where it is not trained
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        self.a_records = list(records)
        self.num_a = self.num_classes
        classifiers = classifiers_of(net)
        if not classifiers:
            raise RecipeError(f"training.method domainmix needs a network with an identity classifier "
                              f"(OSNet-AIN, MSINet); {type(net).__name__} has none")
        self.embed_dim = next(iter(classifiers.values())).in_features
        for clf in classifiers.values():
            clf.register_load_state_dict_pre_hook(_resize_on_load(clf))
        self.b_dataset = self.b_records = self.b_true = None
        if self.b_ref is not None:
            self.b_dataset, self.b_records, self.b_true = self._load_b(ctx)
            log.info("DomainMix: A = %s (%d images, %d ids, labelled), B = %s (%d images, %s)", ctx.dataset.name,
                     len(self.a_records), self.num_a, self.b_ref.name, len(self.b_records),
                     "true labels (upper bound)" if self.b_labels else "labels never read")

    def build_loss(self, num_classes: int) -> None:
        """No recipe loss object: Eq. 4 / 11 are composed in the steps from the ID term
        (``loss.kwargs.label_smooth``) and the batch-hard triplet (``loss.kwargs.triplet_margin``)."""
        from nasreid.losses.triplet import TripletLoss

        self.triplet = TripletLoss(float(reid_loss_setting(self.ctx.recipe, "triplet_margin")))
        return None

    def build_optimizers(self, model: nn.Module):
        """The network's optimiser (base: ``optim.lr_mult`` groups), then the discriminator (Fig. 5) with its
        own optimiser at ``disc_lr_mult`` times the learning rate, same type and schedule."""
        optimizer, scheduler = super().build_optimizers(model)
        optim = self.ctx.recipe.optim
        self.disc = DomainDiscriminator(self.embed_dim, self.disc_hidden, 2).to(self.ctx.device.device)
        disc_cfg = optim.model_copy(update={"lr": optim.lr * self.disc_lr_mult})
        self.disc_opt = self.ctx.build_optimizer(list(self.disc.parameters()), disc_cfg)
        self.disc_sched = self.ctx.build_scheduler(self.disc_opt, disc_cfg)
        return optimizer, scheduler

    def build_hooks(self, hooks):
        """The run state (pseudo labels, clustering log) first, then the base hooks."""
        return [_DomainMixState(self), *super().build_hooks(hooks)]

    def build_trainer(self, model: nn.Module, *, epochs: int, hooks: list[Hook], records, run_dir):
        """The trainer over A's loader (stage hooks replace it per epoch) with a second optimiser slot
        ``discriminator``."""
        self.stage, self.n3, self.disc_epoch = "source", 0, False
        self.run_dir = Path(run_dir) if run_dir is not None else self.ctx.run_dir
        self.trainer = trainer = self.ctx.trainer(
            model, self.step, loader=self._loader(self.a_records), optimizer=self.optimizer,
            scheduler=self.scheduler, hooks=hooks, epochs=epochs, run_dir=run_dir, ddp=False)
        trainer.register_optimizer("discriminator", self.disc_opt, self.disc_sched, module=self.disc)
        return trainer

    # ---------------------------------------------------------------------------------------- report
    def write_report(self, trainer) -> None:
        """``pseudo_labels.csv`` and ``pseudo_labels.png`` (clusters and purity per epoch) in the run folder."""
        if not self.cluster_log or self.run_dir is None:
            return
        import pandas as pd

        df = pd.DataFrame(self.cluster_log)
        df["epoch"] = df["epoch"] + 1
        df.to_csv(self.run_dir / "pseudo_labels.csv", index=False)
        try:
            plot_pseudo_labels(df, self.run_dir / "pseudo_labels.png")
        except Exception as e:  # the CSV is the record; a plot failure must not fail a finished run
            log.warning("pseudo_labels.png not written: %s", e)


def plot_pseudo_labels(csv_or_frame, out) -> Path:
    """Plot a DomainMix run's ``pseudo_labels.csv`` (or its DataFrame): clusters kept per epoch, the share of B
    kept and, where logged, purity and ARI against B's true labels (report only). Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = csv_or_frame if isinstance(csv_or_frame, pd.DataFrame) else pd.read_csv(csv_or_frame)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(df["epoch"], df["clusters"], "o-", color="tab:blue", label="clusters kept (Eq. 1)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clusters kept (Eq. 1)", color="tab:blue")
    ax2 = ax.twinx()
    share = df["b_kept"] / (df["b_kept"] + df["b_dropped"] + df["b_noise"]).clip(lower=1)
    ax2.plot(df["epoch"], share, "d-.", color="tab:gray", label="share of B kept")
    if "purity" in df:
        ax2.plot(df["epoch"], df["purity"], "s--", color="tab:red", label="purity (report only)")
    if "ari" in df:
        ax2.plot(df["epoch"], df["ari"], "^:", color="tab:green", label="ARI (report only)")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share kept; purity / ARI vs true ids")
    ax2.legend(loc="upper right", fontsize=7)
    ax.set_title("DomainMix stage 1: pseudo labels of B")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
