"""Query-Adaptive Convolution (QAConv): S. Liao and L. Shao, "Interpretable and Generalizable Person
Re-Identification with Query-Adaptive Convolution and Temporal Lifting", ECCV 2020.

A learned *pairwise* matcher on feature maps instead of a distance between pooled vectors:

* **Feature maps** (Sec. 3.1, 5.1). The output of one backbone stage (the paper: ResNet ``layer3``, because
  ``layer4`` is too small) ``[B, C, h, w]`` goes through a 1x1 convolution ``C -> d`` (``d = 128``) and is
  L2-normalised over the channels at every location: :meth:`QAConvHead.extract` / :meth:`QAConvHead.normalize`.
* **Query-adaptive convolution** (Sec. 3.1, Fig. 1, 3). The ``s x s`` patches at every location of the probe
  map become ``hw`` convolution kernels ``[hw, d, s, s]`` applied to the gallery map, giving ``hw x hw``
  similarities per pair; with ``s = 1`` (the paper's setting) each one is the cosine similarity of a probe
  location and a gallery location. A global max pooling (GMP) over the gallery locations for each probe
  location, and over the probe locations for each gallery location, keeps the best local correspondences: a
  ``2hw`` vector per pair (:meth:`QAConvHead.match`).
* **BN-FC-BN** (Sec. 3.2). ``BatchNorm1d(2hw) -> Linear(2hw, 1) -> BatchNorm1d(1)`` maps that vector to one
  logit per pair; its sigmoid is the matching probability (:meth:`QAConvHead.forward` returns logits,
  :meth:`QAConvHead.similarity` the sigmoid, blocked, for evaluation).
* **Class memory** (Sec. 3.3). :class:`QAConvMemory` caches one map ``[d, h, w]`` per training class, replaced
  by the most recent sample of the class after every step; a batch is matched against the whole memory.
* **Loss** (Sec. 3.4, Eq. 1-2). :func:`qaconv_focal_loss`: binary cross-entropy on the ``b x c`` pairs with a
  focal weight ``(1 - p_hat)^gamma`` (``gamma = 2``, Lin et al., ICCV 2017), summed over classes and averaged
  over the batch.

One training step (``net`` any backbone, the head attached as ``net.qaconv``)::

    head = attach_qaconv(net, "layer3", (256, 128))              # once; head.dim = 128
    memory = QAConvMemory(num_classes, head.dim, head.height, head.width)
    maps = head.extract(net, images)                               # [b, d, h, w], backbone stops at the stage
    logits = head(maps, memory.maps)                               # [b, c]
    loss = qaconv_focal_loss(logits, pids)                         # Eq. 1
    loss.backward(); optimizer.step()
    memory.update(maps, pids)                                      # Sec. 3.3, after the loss

Memory: matching ``P`` probe maps against ``G`` gallery maps materialises ``P * G * hw * hw`` similarities
(e.g. 32 x 485 pairs at 8x4 maps: 16 M floats; 3,368 x 15,913 pairs at 24x8 maps: 2e12 -- never at once).
:meth:`QAConvHead.forward` does not block (the caller chooses ``P`` and ``G``); :meth:`QAConvHead.similarity`
does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nasreid.errors import NasreidError

__all__ = [
    "QAConvError", "QAConvHead", "QAConvMemory", "attach_qaconv", "capture_stage", "qaconv_diagnostics",
    "qaconv_focal_loss", "qaconv_reference",
]

#: default bound on the similarities one tile of :meth:`QAConvHead.similarity` holds (``p_t * g_t * hw * hw``)
DEFAULT_BLOCK_ELEMENTS = {"cpu": 2 ** 19, "cuda": 2 ** 30}


class QAConvError(NasreidError, ValueError):
    """A QAConv head used wrongly: unknown stage, a stage output that is not a map, maps of the wrong shape,
    a second, different head on the same network."""


def capture_stage(net: nn.Module, stage: str, images: torch.Tensor) -> torch.Tensor:
    """Output ``[B, C, h, w]`` of stage ``stage`` of ``net`` on ``images [B, 3, H, W]``; the forward stops there.

    A nasreid network runs :meth:`~nasreid.models.interface.ReIDNetwork.forward_intermediates` with
    ``stop_at=stage`` (its stages: ``feature_info``); any other network is taken as the chain of its top-level
    children (:func:`~nasreid.models.interface.as_stages`; torchvision's ResNets are such chains). No module
    after the stage runs. Autograd, train/eval mode and BN statistics behave as in a normal forward up to it.

    Raises:
        QAConvError: ``stage`` is not a stage of ``net`` (the message lists them), its output is not a 4-D
            tensor, or its batch size is not ``B``.
    """
    from .interface import NetworkInterfaceError, ReIDNetwork, as_stages, run_stages

    if not isinstance(stage, str) or not stage:
        raise QAConvError(f"QAConv stage must be a non-empty stage name, got {stage!r}")
    if stage == "qaconv" or stage.startswith("qaconv."):
        raise QAConvError(f"QAConv stage {stage!r} is inside the QAConv head itself; name a backbone stage")
    try:
        if isinstance(net, ReIDNetwork):
            out = net.forward_intermediates(images, stop_at=stage)[stage]
        else:
            out = run_stages(as_stages(net), images, stage, type(net).__name__)[stage]
    except NetworkInterfaceError as e:
        raise QAConvError(f"QAConv stage {stage!r}: the stage must give a feature map of the backbone; {e}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise QAConvError(f"QAConv stage {stage!r} must output a feature map [B, C, h, w], got {got}")
    if out.shape[0] != images.shape[0]:
        raise QAConvError(f"QAConv stage {stage!r} output {tuple(out.shape)} has batch size {out.shape[0]} for "
                          f"{images.shape[0]} images (a module run on stripes or crops?); choose another stage")
    return out


def _unit_patches(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """``[N, d, h, w] -> [N, hw, d * s * s]``: the ``s x s`` patch (zero padded) around every location."""
    if kernel == 1:
        return maps.flatten(2).transpose(1, 2)
    cols = F.unfold(maps, kernel_size=kernel, padding=kernel // 2)  # [N, d*s*s, hw]
    return cols.transpose(1, 2)


class QAConvHead(nn.Module):
    """QAConv matcher on the maps of one backbone stage (Liao & Shao, ECCV 2020, Sec. 3.1-3.2, Fig. 3).

    Args:
        in_channels: ``C``, channels of the stage's output.
        height, width: ``h, w`` of the stage's output map (fixed: the BN-FC-BN block has ``2hw`` inputs).
        stage: the backbone stage whose output is the feature map (a name of the network's ``feature_info``;
            paper: ResNet ``"layer3"``).
        dim: ``d``, output channels of the 1x1 convolution (paper: 128); ``None``: no convolution, ``d = C``.
        kernel: ``s``, the odd size of the query-adaptive kernels (paper: 1, for memory and speed).

    Attributes: ``in_channels``, ``dim`` (= d), ``height``, ``width``, ``stage``, ``kernel``; modules ``reduce``
    (``Conv2d(C, d, 1)``, with bias, or ``None``), ``bn_in`` (``BatchNorm1d(2hw)``), ``fc``
    (``Linear(2hw, 1)``), ``bn_out`` (``BatchNorm1d(1)``).

    Similarity of locations (:meth:`match`): with ``s = 1`` the dot product of the unit channel vectors, i.e. the
    cosine similarity, in ``[-1, 1]``. With ``s > 1`` the probe's ``s x s`` patch around location ``i`` is the
    kernel and the convolution is evaluated at gallery location ``j`` (PyTorch convolution = cross-correlation):
    ``sum_{|u|,|v| <= s//2} <p[y_i + u, x_i + v], g[y_j + u, x_j + v]>``, with zero padding (positions outside
    either map contribute 0), so values lie in ``[-s*s, s*s]`` (not re-normalised; the BN that follows rescales).

    Raises:
        QAConvError: non-positive sizes, an even or non-positive kernel, an empty stage name.
    """

    def __init__(self, in_channels: int, height: int, width: int, stage: str, dim: int | None = 128,
                 kernel: int = 1):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QAConvError(f"QAConvHead: {name} must be a positive integer, got {v!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise QAConvError(f"QAConvHead: dim must be a positive integer or None, got {dim!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise QAConvError(f"QAConvHead: kernel must be an odd positive integer, got {kernel!r}")
        if not isinstance(stage, str) or not stage:
            raise QAConvError(f"QAConvHead: stage must be a non-empty module name, got {stage!r}")
        self.in_channels, self.height, self.width = in_channels, height, width
        self.stage, self.kernel = stage, kernel
        self.dim = in_channels if dim is None else dim
        self.reduce = None if dim is None else nn.Conv2d(in_channels, dim, kernel_size=1)
        hw2 = 2 * height * width
        self.bn_in = nn.BatchNorm1d(hw2)
        self.fc = nn.Linear(hw2, 1)
        self.bn_out = nn.BatchNorm1d(1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Start as the plain matcher of the stage's map (nasreid's initialisation; the paper does not give one).

        * ``fc``: every weight ``1 / 2hw``, bias 0, so the first logits rank pairs by the mean of their ``2hw`` best
          local matches (after ``bn_in``), a matcher that already works on a pretrained backbone; PyTorch's default
          (uniform, half the weights negative) starts from a random mix of them.
        * ``reduce``: (semi-)orthogonal weight, bias 0 -- for ``d == C`` a rotation, which leaves every cosine
          similarity of the map unchanged (for ``d > C`` too: orthonormal columns); for ``d < C`` a projection onto
          ``d`` orthonormal directions. The default init adds one random bias vector to every location, which pulls
          all unit vectors towards it.

        Measured (issue 28; MSMT17 OSNet x0.25, CUHK03 at 128x64, conv4, AMSGrad 0.0015): after the frozen first
        epoch (head only) the training accuracy over the 372 classes was 0.58 % with the default init and 8.3 %
        with this one; ``tests/test_qaconv_method.py`` checks on real images that a fresh head ranks as the plain
        QAConv similarity does.
        """
        nn.init.constant_(self.fc.weight, 1.0 / self.fc.in_features)
        nn.init.zeros_(self.fc.bias)
        if self.reduce is not None:
            nn.init.orthogonal_(self.reduce.weight.view(self.reduce.out_channels, -1))
            if self.reduce.bias is not None:
                nn.init.zeros_(self.reduce.bias)
        for bn in (self.bn_in, self.bn_out):
            bn.reset_parameters()

    # ---- feature maps -----------------------------------------------------------------------------------------
    def extract(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Normalised maps ``[B, d, h, w]`` of ``images [B, 3, H, W]``: ``normalize(capture_stage(net, stage))``.

        ``net`` runs only up to the stage (``forward_intermediates(stop_at=stage)``, see :func:`capture_stage`), in its
        current train/eval mode, with gradients when enabled (training flows into the backbone).

        Raises:
            QAConvError: unknown stage, a stage output that is not ``[B, C, h, w]``, or of the wrong ``C``.
        """
        return self.normalize(capture_stage(net, self.stage, images))

    def normalize(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w] -> [B, d, h, w]``: 1x1 convolution (if any), then L2 normalisation over the channels at
        every location (Sec. 3.1; a zero vector stays zero).

        Raises:
            QAConvError: not 4-D or ``C != in_channels``.
        """
        if fmap.ndim != 4 or fmap.shape[1] != self.in_channels:
            raise QAConvError(f"QAConvHead.normalize expects [B, {self.in_channels}, h, w] maps from stage "
                              f"{self.stage!r}, got {tuple(fmap.shape)}")
        if self.reduce is not None:
            fmap = self.reduce(fmap)
        return F.normalize(fmap, p=2, dim=1)

    # ---- matching ---------------------------------------------------------------------------------------------
    def _check_maps(self, name: str, maps: torch.Tensor) -> None:
        want = (self.dim, self.height, self.width)
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or tuple(maps.shape[1:]) != want:
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise QAConvError(f"QAConv {name} maps must be [N, {self.dim}, {self.height}, {self.width}] "
                              f"(normalised output of extract), got {got}")

    def match(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """QAConv + two-way global max pooling (Sec. 3.1): ``[P, d, h, w], [G, d, h, w] -> [P, G, 2hw]``.

        The similarities ``sim[p, g, i, j]`` of probe location ``i`` and gallery location ``j`` (row-major
        ``i = y * w + x``; see the class docstring for ``s > 1``) come from one matrix product
        ``[P*hw, d*s*s] x [d*s*s, G*hw]``. Output entry ``[p, g, k]``:

        * ``k < hw``: ``max_j sim[p, g, k, j]``, the best gallery match of probe location ``k``;
        * ``k >= hw``: ``max_i sim[p, g, i, k - hw]``, the best probe match of gallery location ``k - hw``.

        Memory: ``P * G * hw * hw`` similarities in the dtype of the maps (plus the graph when grad is on).

        Raises:
            QAConvError: maps not ``[N, d, h, w]`` with this head's ``d, h, w``.
        """
        self._check_maps("probe", probe)
        self._check_maps("gallery", gallery)
        hw = self.height * self.width
        num_p, num_g = probe.shape[0], gallery.shape[0]
        gallery = gallery.to(probe.dtype)
        pk = _unit_patches(probe, self.kernel).reshape(num_p * hw, -1)  # [P*hw, D]
        gk = _unit_patches(gallery, self.kernel).reshape(num_g * hw, -1)  # [G*hw, D]
        sim = (pk @ gk.t()).view(num_p, hw, num_g, hw)  # [P, hw_p, G, hw_g]
        best_g = sim.amax(dim=3).transpose(1, 2)  # [P, G, hw_p]: max over gallery locations
        best_p = sim.amax(dim=1)  # [P, G, hw_g]: max over probe locations
        return torch.cat((best_g, best_p), dim=2)

    def classify(self, scores: torch.Tensor) -> torch.Tensor:
        """BN-FC-BN (Sec. 3.2): ``[..., 2hw] -> [...]`` logits (float32 whatever the input dtype).

        In training mode the two BNs use the statistics of all pairs given (and update their running ones)."""
        lead = scores.shape[:-1]
        x = scores.reshape(-1, scores.shape[-1]).to(self.fc.weight.dtype)
        return self.bn_out(self.fc(self.bn_in(x))).view(lead)

    def forward(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Matching logits ``[P, G]`` of probe maps ``[P, d, h, w]`` and gallery maps ``[G, d, h, w]``
        (normalised, from :meth:`extract`): ``classify(match(probe, gallery))``. The sigmoid of a logit is the
        probability that the pair shows the same person; apply it yourself or use :meth:`similarity`.

        Not blocked: memory ``O(P * G * hw * hw)`` (the caller chooses ``P``, ``G``). During training ``gallery``
        is usually the class memory (``[c, d, h, w]``, :class:`QAConvMemory`); the BNs then normalise over the
        ``P * G`` pairs, so training mode needs ``P * G > 1``.

        Raises:
            QAConvError: maps of the wrong shape. ValueError (from BatchNorm): a single pair in training mode.
        """
        return self.classify(self.match(probe, gallery))

    @torch.no_grad()
    def similarity(self, probe: torch.Tensor, gallery: torch.Tensor, block_size: int = 256, *,
                   max_block_elements: int | None = None) -> torch.Tensor:
        """Evaluation scores ``sigmoid(forward(probe, gallery))`` in ``[0, 1]``, shape ``[P, G]`` (float32, on
        the probe's device), computed block by block without gradients.

        Blocking: the gallery is cut into blocks of ``block_size`` maps. Within a block, the similarities are
        computed tile by tile, a tile of ``p_t x g_t`` pairs holding at most
        ``max(max_block_elements, hw * hw)`` similarities (``g_t = min(block_size, max_block_elements // hw^2)``,
        at least 1); each tile's two-way max pooling goes into a ``[p_b, g_b, 2hw]`` buffer (``p_b`` probes of the
        block, at most ``max(p_t, 2**22 / (2hw * block_size))``), and the BN-FC-BN runs once per block.
        Default ``max_block_elements``: ``2**19`` on CPU (a tile's similarities, 2 MiB in float32, stay in the
        cache; on this project's CPU, one thread, 24x8 maps: 8.3k pairs/s, against 4.4k with one 256-map block
        per matrix product and 5.5k for a per-pair loop), ``2**30`` on CUDA (few, large kernels). Memory: the
        tile, the buffer and the output, whatever ``P`` and ``G`` (with ``s > 1`` also the unfolded patches,
        ``s * s`` times the maps).

        The BN layers always use their running statistics here (the head is put in eval mode for the call and
        restored). ``gallery`` may be float16 (e.g. on CUDA); ``probe`` is cast to its dtype for the matching,
        the BN-FC-BN runs in float32.

        Raises:
            QAConvError: maps of the wrong shape, or ``block_size < 1``.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise QAConvError(f"block_size must be a positive integer, got {block_size!r}")
        self._check_maps("probe", probe)
        self._check_maps("gallery", gallery)
        device = probe.device
        gallery = gallery.to(device)
        probe = probe.to(gallery.dtype)
        if max_block_elements is None:
            max_block_elements = DEFAULT_BLOCK_ELEMENTS.get(device.type, 2 ** 26)
        hw = self.height * self.width
        num_p, num_g = probe.shape[0], gallery.shape[0]
        out = torch.empty(num_p, num_g, dtype=torch.float32, device=device)
        if num_p == 0 or num_g == 0:
            return out
        g_block = min(block_size, num_g)
        tile_pairs = max(1, max_block_elements // (hw * hw))
        g_tile = min(g_block, tile_pairs)
        p_tile = max(1, min(num_p, tile_pairs // g_tile))
        p_block = min(num_p, max(p_tile, (2 ** 22 // (2 * hw * g_block)) // p_tile * p_tile))
        pk = _unit_patches(probe, self.kernel).reshape(num_p, hw, -1)  # [P, hw, D]
        gk = _unit_patches(gallery, self.kernel).reshape(num_g, hw, -1)  # [G, hw, D]
        buf = torch.empty(p_block, g_block, 2 * hw, dtype=probe.dtype, device=device)
        was_training = self.training
        self.eval()
        try:
            for gs in range(0, num_g, g_block):
                ge = min(gs + g_block, num_g)
                for ps in range(0, num_p, p_block):
                    pe = min(ps + p_block, num_p)
                    for ts in range(gs, ge, g_tile):
                        te = min(ts + g_tile, ge)
                        gt = gk[ts:te].reshape(-1, gk.shape[2]).t()  # [D, g_t*hw]
                        for qs in range(ps, pe, p_tile):
                            qe = min(qs + p_tile, pe)
                            sim = (pk[qs:qe].reshape(-1, pk.shape[2]) @ gt).view(qe - qs, hw, te - ts, hw)
                            buf[qs - ps:qe - ps, ts - gs:te - gs, :hw] = sim.amax(dim=3).transpose(1, 2)
                            buf[qs - ps:qe - ps, ts - gs:te - gs, hw:] = sim.amax(dim=1)
                    logits = self.classify(buf[:pe - ps, :ge - gs])
                    out[ps:pe, gs:ge] = torch.sigmoid(logits)
        finally:
            self.train(was_training)
        return out

    def extra_repr(self) -> str:
        return (f"stage={self.stage!r}, in_channels={self.in_channels}, dim={self.dim}, "
                f"map={self.height}x{self.width}, kernel={self.kernel}")


def attach_qaconv(net: nn.Module, stage: str, input_size: tuple[int, int] | Sequence[int], dim: int | None = 128,
                  kernel: int = 1) -> QAConvHead:
    """Create a :class:`QAConvHead` for ``net``'s module ``stage`` and set it as ``net.qaconv``.

    ``C, h, w`` are read from one forward of a ``[2, 3, H, W]`` zero batch (``input_size = (H, W)``) in eval mode
    without gradients, stopped at the stage; ``net``'s train/eval mode is restored. The head is a submodule
    (``net.qaconv``), so it is saved and loaded with ``net.state_dict()`` and moved by ``net.to()``; it is created
    on the device and dtype of ``net``'s first parameter. ``net``'s own forward does not use it.

    If ``net`` already has a :class:`QAConvHead` with the same configuration (stage, C, h, w, dim, kernel), that
    head is returned unchanged (idempotent, keeps trained weights).

    Raises:
        QAConvError: unknown stage / non-map output (see :func:`capture_stage`), a bad ``input_size``, or an
            existing ``net.qaconv`` that is not a head of this configuration (delete it first:
            ``del net.qaconv``).
    """
    try:
        height, width = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise QAConvError(f"input_size must be (height, width), got {input_size!r}") from None
    if height < 1 or width < 1:
        raise QAConvError(f"input_size must be positive, got {input_size!r}")
    existing = getattr(net, "qaconv", None)
    if existing is not None and not isinstance(existing, QAConvHead):
        raise QAConvError(f"{type(net).__name__} already has an attribute 'qaconv' of type "
                          f"{type(existing).__name__}; cannot attach a QAConv head")
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            fmap = capture_stage(net, stage, torch.zeros(2, 3, height, width, device=device, dtype=dtype))
    finally:
        net.train(was_training)
    _, channels, h, w = fmap.shape
    want_dim = channels if dim is None else dim
    if existing is not None:
        same = (existing.stage, existing.in_channels, existing.height, existing.width, existing.dim,
                existing.kernel, existing.reduce is None) == (stage, channels, h, w, want_dim, kernel, dim is None)
        if same:
            return existing
        raise QAConvError(f"{type(net).__name__} already has a QAConv head ({existing.extra_repr()}); delete it "
                          f"first (del net.qaconv) to attach one on stage {stage!r} with dim={dim}, kernel={kernel}")
    head = QAConvHead(channels, h, w, stage, dim=dim, kernel=kernel).to(device=device, dtype=dtype)
    head.train(was_training)
    net.qaconv = head
    return head


class QAConvMemory(nn.Module):
    """Class memory of QAConv (Sec. 3.3): one feature map per training class, ``maps [c, d, h, w]`` (a buffer).

    Update by *direct replacement* (the paper's choice over a moving average): after the loss of a step,
    the map of every class present in the batch becomes the class's most recent sample -- the *last*
    occurrence of the class in the batch --, detached from the graph. Classes absent from the batch keep their
    maps. Initial content: zeros (a zero map's similarities are all 0); ``filled [c]`` (bool buffer) says which
    classes have been written at least once.

    Args:
        num_classes: ``c`` (pids ``0..c-1``). dim, height, width: ``d, h, w`` of the head's maps.

    Raises:
        QAConvError: non-positive sizes; (update) shapes that disagree or a pid outside ``[0, c)``.
    """

    maps: torch.Tensor  # buffers (registered in __init__)
    filled: torch.Tensor

    def __init__(self, num_classes: int, dim: int, height: int, width: int):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("dim", dim), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QAConvError(f"QAConvMemory: {name} must be a positive integer, got {v!r}")
        self.num_classes, self.dim, self.height, self.width = num_classes, dim, height, width
        self.register_buffer("maps", torch.zeros(num_classes, dim, height, width))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, maps: torch.Tensor, pids: torch.Tensor) -> None:
        """Direct replacement: ``self.maps[pids[i]] = maps[i]`` for the last ``i`` of each class in the batch.

        Args:
            maps: ``[b, d, h, w]`` normalised maps of the batch (any dtype / device; stored detached, converted to
                the memory's dtype and device). pids: ``[b]`` integer labels in ``[0, c)``.
        """
        want = (self.dim, self.height, self.width)
        pids = torch.as_tensor(pids)
        if maps.ndim != 4 or tuple(maps.shape[1:]) != want or pids.shape != (maps.shape[0],):
            raise QAConvError(f"QAConvMemory.update expects maps [b, {self.dim}, {self.height}, {self.width}] and "
                              f"pids [b], got {tuple(maps.shape)} and {tuple(pids.shape)}")
        if pids.dtype.is_floating_point or pids.dtype == torch.bool:
            raise QAConvError(f"QAConvMemory.update: pids must be integers, got {pids.dtype}")
        b = pids.numel()
        if b == 0:
            return
        pids = pids.to(self.maps.device, torch.long)
        lo, hi = int(pids.min()), int(pids.max())
        if lo < 0 or hi >= self.num_classes:
            raise QAConvError(f"QAConvMemory.update: pids must be in [0, {self.num_classes}), got [{lo}, {hi}]")
        pos = torch.arange(b, device=pids.device)
        last = torch.full((self.num_classes,), -1, dtype=torch.long, device=pids.device)
        last.scatter_reduce_(0, pids, pos, reduce="amax", include_self=True)
        classes = (last >= 0).nonzero().squeeze(1)
        src = maps.detach()[last[classes].to(maps.device)]
        self.maps[classes] = src.to(self.maps.device, self.maps.dtype)
        self.filled[classes] = True

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, map=[{self.dim}, {self.height}, {self.width}], update=replace"


def _check_logits(logits: torch.Tensor, pids: torch.Tensor, who: str) -> torch.Tensor:
    pids = torch.as_tensor(pids, device=logits.device)
    if logits.ndim != 2 or pids.shape != (logits.shape[0],):
        raise QAConvError(f"{who} expects logits [b, c] and pids [b], got {tuple(logits.shape)} and "
                          f"{tuple(pids.shape)}")
    if pids.dtype.is_floating_point or pids.dtype == torch.bool:
        raise QAConvError(f"{who}: pids must be integers, got {pids.dtype}")
    if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= logits.shape[1]):
        raise QAConvError(f"{who}: pids must be in [0, {logits.shape[1]}), got [{int(pids.min())}, "
                          f"{int(pids.max())}]")
    return pids.long()


def qaconv_focal_loss(logits: torch.Tensor, pids: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal binary cross-entropy of QAConv, Eq. 1-2 (Sec. 3.4).

    ``loss = -(1/b) sum_i sum_j (1 - p_hat_ij)^gamma log(p_hat_ij)`` with ``p_ij = sigmoid(logits_ij)``,
    ``p_hat_ij = p_ij`` for the positive pair ``j = pids[i]`` and ``1 - p_ij`` otherwise. Computed as
    ``z = ±logits`` (sign of the label), ``log p_hat = logsigmoid(z)``, ``1 - p_hat = sigmoid(-z)``: finite for
    any logit. ``gamma = 0`` is the plain BCE summed over classes, averaged over the batch. Gradients flow
    through the focal weight too (as in Lin et al., ICCV 2017).

    Args:
        logits: ``[b, c]`` logits of the batch against the ``c`` classes (the class memory).
        pids: ``[b]`` labels in ``[0, c)``. gamma: focusing parameter (paper: 2), ``>= 0``.

    Returns:
        A float32 scalar.

    Raises:
        QAConvError: bad shapes, labels out of range, or ``gamma < 0``.
    """
    if not gamma >= 0:
        raise QAConvError(f"qaconv_focal_loss: gamma must be >= 0, got {gamma!r}")
    pids = _check_logits(logits, pids, "qaconv_focal_loss")
    x = logits.float()
    sign = torch.full_like(x, -1.0)
    sign.scatter_(1, pids.unsqueeze(1), 1.0)
    z = sign * x
    log_p_hat = F.logsigmoid(z)
    loss = -log_p_hat if gamma == 0 else -torch.sigmoid(-z).pow(gamma) * log_p_hat
    return loss.sum() / max(x.shape[0], 1)


@torch.no_grad()
def qaconv_diagnostics(logits: torch.Tensor, pids: torch.Tensor) -> dict[str, float]:
    """Training diagnostics of ``logits [b, c]`` against the memory classes (fractions / probabilities):

    * ``acc``: fraction of rows whose own class has the highest logit (ties count against);
    * ``pos_prob``: mean ``sigmoid`` of the positive pairs; ``neg_prob``: mean over the negative pairs;
    * ``hard_neg_prob``: mean over rows of the highest negative probability.

    Raises:
        QAConvError: bad shapes or labels out of range.
    """
    pids = _check_logits(logits, pids, "qaconv_diagnostics")
    b, c = logits.shape
    if b == 0:
        return {"acc": float("nan"), "pos_prob": float("nan"), "neg_prob": float("nan"),
                "hard_neg_prob": float("nan")}
    x = logits.float()
    pos = x.gather(1, pids.unsqueeze(1)).squeeze(1)
    neg = x.scatter(1, pids.unsqueeze(1), float("-inf"))
    hard = neg.amax(dim=1)
    p = torch.sigmoid(x)
    neg_mask = torch.ones_like(p, dtype=torch.bool).scatter_(1, pids.unsqueeze(1), False)
    return {
        "acc": float((pos > hard).float().mean()) if c > 1 else 1.0,
        "pos_prob": float(torch.sigmoid(pos).mean()),
        "neg_prob": float(p[neg_mask].mean()) if c > 1 else float("nan"),
        "hard_neg_prob": float(torch.sigmoid(hard).mean()) if c > 1 else float("nan"),
    }


@torch.no_grad()
def qaconv_reference(head: QAConvHead, probe: torch.Tensor, gallery: torch.Tensor, *,
                     return_scores: bool = False):
    """Slow, explicit QAConv for tests (small inputs): the same logits ``[P, G]`` as ``head(probe, gallery)``.

    Python loops over pairs, probe locations, gallery locations and kernel offsets; one ``torch.dot`` per
    ``d``-vector. BN-FC-BN written out: in eval mode with the running statistics, in training mode with the
    (biased) statistics over the ``P * G`` pairs, without updating the running ones.

    Returns:
        logits ``[P, G]`` (float64), or ``(logits, scores [P, G, 2hw])`` with ``return_scores``.
    """
    h, w, s = head.height, head.width, head.kernel
    r = s // 2
    hw = h * w
    pr, gr = probe.double(), gallery.double()
    num_p, num_g = pr.shape[0], gr.shape[0]
    scores = torch.zeros(num_p, num_g, 2 * hw, dtype=torch.float64)
    for p in range(num_p):
        for g in range(num_g):
            sim = torch.zeros(hw, hw, dtype=torch.float64)
            for i in range(hw):
                yi, xi = divmod(i, w)
                for j in range(hw):
                    yj, xj = divmod(j, w)
                    total = 0.0
                    for u in range(-r, r + 1):
                        for v in range(-r, r + 1):
                            a, b = (yi + u, xi + v), (yj + u, xj + v)
                            if 0 <= a[0] < h and 0 <= a[1] < w and 0 <= b[0] < h and 0 <= b[1] < w:
                                total += float(torch.dot(pr[p, :, a[0], a[1]], gr[g, :, b[0], b[1]]))
                    sim[i, j] = total
            for i in range(hw):
                scores[p, g, i] = max(float(sim[i, j]) for j in range(hw))
            for j in range(hw):
                scores[p, g, hw + j] = max(float(sim[i, j]) for i in range(hw))

    def bn(x, m):  # x [N, F]
        if m.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        else:
            mean, var = m.running_mean.double(), m.running_var.double()
        return (x - mean) / torch.sqrt(var + m.eps) * m.weight.double() + m.bias.double()

    x = scores.reshape(-1, 2 * hw)
    x = bn(x, head.bn_in)
    x = x @ head.fc.weight.double().t() + head.fc.bias.double()
    logits = bn(x, head.bn_out).view(num_p, num_g)
    return (logits, scores) if return_scores else logits
