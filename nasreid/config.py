"""Recipe schema and loading: YAML -> validated :class:`Recipe` (pydantic v2).

Every key is declared; an unknown key, a wrong type or a missing file is an error that names the recipe
file and the dotted key (e.g. ``recipes/x.yaml: optim.lr: Input should be a valid number``).
Paper defaults live in the recipes, not here; the defaults below are only sane fallbacks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nasreid.errors import RecipeError  # re-exported: defined in the leaf errors module

__all__ = [
    "RecipeError",
    "Recipe",
    "DataConfig",
    "SpaceConfig",
    "StrategyConfig",
    "OptimConfig",
    "LossConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainingConfig",
    "load_recipe",
    "apply_overrides",
    "resolve_data_root",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(BaseModel):
    """Training augmentation (torchvision v2): four built-in switches, and any registered augmentation by its
    name (``nasreid list augmentations``) with its settings, e.g. ``rsa: {p: 0.5}`` (random shifting, RMGL
    Sec. III-D) or ``random_block: {p: 0.5, max_ratio: 0.8}`` (QAConv Sec. 5.1); ``null`` switches one off.

    Each named augmentation is validated by its registered ``Config`` (an unknown name or key is an error naming
    it) and stored with its defaults filled in.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    flip: bool = True
    color_jitter: bool = False
    random_erasing: bool = False
    pad: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _registered(self):
        from nasreid.registry import AUGMENTATIONS

        extra = self.__pydantic_extra__ or {}
        for name, kwargs in list(extra.items()):
            if kwargs is None:
                continue
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS.names())} "
                                 f"(and flip, color_jitter, random_erasing, pad)")
            if not isinstance(kwargs, dict):
                raise ValueError(f"{name}: give the augmentation's settings as a mapping, or null to switch it "
                                 f"off, got {kwargs!r}")
            cfg = AUGMENTATIONS.validate(name, kwargs, f"data.augment.{name}")
            extra[name] = cfg.model_dump() if cfg is not None else dict(kwargs)
        return self


class DatasetRef(_Strict):
    """A dataset by registry name, root folder (None: ``$NASREID_DATA``/default) and parser options."""

    name: str
    root: Optional[str] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    """Training data, loader and input size."""

    dataset: DatasetRef
    height: int = Field(256, gt=0, multiple_of=16)
    width: int = Field(128, gt=0, multiple_of=16)
    batch_size: int = Field(64, gt=0)
    num_instances: int = Field(4, gt=0, description="K of the PK sampler")
    workers: Optional[int] = Field(
        None, ge=0, description="DataLoader worker processes; null (default): 0 on the CPU (the step's own process "
        "loads the data: worker processes compete with the compute threads, measured slower on 2 cores), "
        "min(4, CPU count) on CUDA")
    cache_images: bool = Field(
        True, description="keep decoded training images in memory (up to 2 GiB) across epochs; pays with workers 0")
    on_corrupt: Literal["error", "skip"] = "error"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    val_ids: Optional[Union[int, float]] = Field(
        None, description="training identities held out as a validation query / gallery set: a count (>= 2) or a "
        "fraction in (0, 1) of the train split's identities, drawn with the split's seed "
        "(nasreid.data.datasets.base.hold_out_validation); searches, HPO and selection read validation, never test; "
        "null (default): none held out, every training identity is trained on")

    @field_validator("val_ids", mode="before")
    @classmethod
    def _val_ids(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"give a count (>= 2) or a fraction in (0, 1) of the training identities, got {v!r}")
        if isinstance(v, int) and v < 2:
            raise ValueError(f"a count of validation identities must be >= 2, got {v}")
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"a fraction of the training identities must be in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _pk(self):
        if self.batch_size % self.num_instances:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_instances {self.num_instances}")
        return self


def loader_workers(recipe: "Recipe") -> int:
    """DataLoader worker processes of ``recipe``: ``data.workers`` when set, else 0 on the CPU (measured on 2 cores:
    worker processes compete with the training step's compute threads, and an epoch of the CPU fine-tune ran
    1.1-1.3x faster without them) and ``min(4, CPU count)`` on CUDA."""
    if recipe.data.workers is not None:
        return recipe.data.workers
    return 0 if recipe.device == "cpu" else min(4, os.cpu_count() or 1)


class SpaceConfig(_Strict):
    """Search space by registry name and constructor arguments (width multiplier, feature dim, ...)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class StrategyConfig(_Strict):
    """Search strategy by registry name; ``kwargs`` are validated by the strategy's own schema."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(_Strict):
    """Optimiser and learning-rate schedule of the network weights."""

    name: Literal["sgd", "adam", "amsgrad", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    epochs: int = Field(60, gt=0)
    scheduler: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: int = Field(0, ge=0)
    warmup_factor: float = Field(0.1, gt=0, le=1)
    warmup_mode: Literal["linear", "exponential"] = Field(
        "linear", description="lr factor from warmup_factor to 1: linear, or exponential (geometric; RMGL "
        "Sec. IV-A warms up exponentially from 1e-5 to 0.01, i.e. warmup_factor 1e-3)")
    lr_mult: dict[str, float] = Field(
        default_factory=dict, description="learning-rate multipliers by parameter-name pattern (fnmatch), e.g. "
        "{'*reduction*': 10, '*classifier*': 10} (RMGL Sec. IV-A: 10x on reduction and classifier layers); "
        "the first matching pattern wins")
    grad_clip: Optional[float] = Field(None, gt=0)


#: keys of the ``reid`` loss that recipes written before they moved under ``loss.kwargs`` hold at the top of
#: ``loss``, with the defaults those recipes had (a run folder's ``recipe.yaml`` lists all three)
MOVED_LOSS_KEYS = {"label_smooth": 0.1, "triplet_weight": 0.0, "triplet_margin": 0.3}


class LossConfig(_Strict):
    """The training loss: ``name`` from the loss registry (``nasreid list losses``) and its ``kwargs``.

    ``reid`` (default) is ID cross-entropy with label smoothing + optional batch-hard triplet
    (:func:`~nasreid.losses.build_reid_loss`: ``kwargs: {label_smooth, triplet_weight, triplet_margin,
    triplet_metric, triplet_soft_margin}``). Recipes written before those settings moved under ``kwargs``
    (``loss: {label_smooth: 0.1, triplet_weight: 1.0}``) still load: the keys are moved into ``kwargs``
    (:func:`load_recipe` says so once); for another loss they must keep their old defaults.
    """

    name: str = "reid"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in MOVED_LOSS_KEYS):
            return data
        data = dict(data)
        kwargs = dict(data.get("kwargs") or {})
        name = data.get("name", "reid")
        for key, old_default in MOVED_LOSS_KEYS.items():
            if key not in data:
                continue
            value = data.pop(key)
            if name == "reid":
                if key in kwargs and kwargs[key] != value:
                    raise ValueError(f"loss.{key} ({value!r}) and loss.kwargs.{key} ({kwargs[key]!r}) disagree; "
                                     f"keep loss.kwargs.{key}")
                kwargs[key] = value
            elif value != old_default:
                raise ValueError(f"loss.{key} applies to loss 'reid' only; loss {name!r} takes its settings under "
                                 f"loss.kwargs")
        data["kwargs"] = kwargs
        return data


class NamedConfig(_Strict):
    """A registered component by name with its constructor arguments."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class EvalConfig(_Strict):
    """Evaluation: same-domain test split of the training dataset plus cross-domain ``targets``."""

    every: int = Field(0, ge=0, description="evaluate every N epochs during training (0: at the end only)")
    every_split: Literal["test", "val"] = Field(
        "test", description="what the evaluation every N epochs (eval.every) reads: the test split, or val: the "
        "validation identities held out by data.val_ids (required then); a retrain's final evaluation is on test, "
        "and on val too when data.val_ids is set")
    flip: bool = False
    metric: Literal["cosine", "euclidean"] = "cosine"
    batch_size: int = Field(128, gt=0)
    ranks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    targets: list[DatasetRef] = Field(default_factory=list)
    matcher: Optional["NamedConfig"] = Field(
        None, description="a registered matcher (nasreid list matchers); None: feature distance with 'metric'")
    postprocessors: list["NamedConfig"] = Field(
        default_factory=list, description="registered row post-processors run after the matcher, in order")


class ModelConfig(_Strict):
    """Fixed network to train: a genotype file or a preset of the space (e.g. ``osnet_ain``), optionally
    initialised from a local weights file (``pretrained``; keys under ``pretrained_skip`` are not loaded)."""

    genotype: Optional[str] = None
    preset: Optional[str] = None
    pretrained: Optional[str] = None
    pretrained_format: str = Field(
        "auto", description="naming of the pretrained file, a registered weights format (nasreid.models.weights; "
        "plugins add more): torchreid's OSNet family (translated exactly onto the osnet / osnet_ibn / "
        "osnet_ain_torchreid presets), torchvision, nasreid; auto: detected")
    pretrained_skip: list[str] = Field(
        default_factory=lambda: ["head.classifier"],
        description="module prefixes left at their initialisation (the classifier: its class count is the "
        "training data's), unless pretrained_keep_fitting and the file's tensors there fit exactly")
    pretrained_keep_fitting: bool = Field(
        True, description="load a pretrained_skip prefix all the same when the file has it with the network's "
        "shapes (a classifier whose class count fits); false: always leave it")
    warm_start: bool = Field(
        False, description="the pretrained file may be of another genotype of the space: every tensor at the same "
        "place is taken, normalisation layers the file lacks (IN of another genotype) start at identity "
        "(nasreid.models.pretrained.warm_start); false: the file must be this network exactly. A search "
        "recipe's model.pretrained always warm-starts the supernet this way")
    calibrate_norms: int = Field(
        64, ge=0, description="warm start: the IN layers the file lacks start at gamma = mean per-image std, "
        "beta = mean per-image mean of their input over this many training images (IN(x) ~ x for an average "
        "image; nasreid.models.pretrained.calibrate_instance_norms); 0: gamma 1, beta 0")

    @field_validator("pretrained_format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        from nasreid.models.weights import PretrainedWeightsError, check_format

        try:
            return check_format(v)
        except PretrainedWeightsError as e:
            raise ValueError(str(e)) from None


class TrainingConfig(_Strict):
    """How a fixed network is trained: a registered training method (``nasreid list methods``) and the
    fine-tuning warm start (first ``freeze_backbone_epochs`` epochs train only ``open_layers``)."""

    method: str = "supervised"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    freeze_backbone_epochs: int = Field(0, ge=0)
    open_layers: Optional[list[str]] = Field(
        None, description="module prefixes trained during the warm start; None: the network's head "
        "(its head_prefixes: OSNet-AIN 'head', MSINet 'head' + the local branch's head, RMGL every branch's "
        "reductions and classifiers)")


class DistributedConfig(_Strict):
    """Data-parallel settings, used only when the run is started by ``torchrun`` (or ``--nproc N``); see
    :mod:`nasreid.engine.distributed`. ``data.batch_size`` is the global batch either way."""

    sync_bn: bool = Field(False, description="SyncBatchNorm over ranks (CUDA only)")
    find_unused_parameters: Optional[bool] = Field(
        None, description="DDP option; None: on for one-shot searches (a hard Gumbel step uses one path) and "
        "frozen-backbone warm starts, off otherwise; turn it on for a network with heads unused in training")
    backend: Optional[Literal["gloo", "nccl"]] = Field(None, description="default: nccl on CUDA, gloo on CPU")
    timeout_minutes: float = Field(30.0, gt=0, description="collective timeout")


class Recipe(_Strict):
    """A whole run: search (``strategy`` set) or retrain (``model`` set)."""

    name: str
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    channels_last: Optional[bool] = Field(
        None, description="torch.channels_last memory format; null (default): on on the CPU, off on CUDA (measured: "
        "DeviceContext.model)")
    compile: bool = Field(
        False, description="torch.compile the trained network (measured on 2 CPU cores: 79 s to compile OSNet x0.25 "
        "at 256x128 for a 12% faster step, paid back after ~2000 steps)")
    output_root: str = "results"
    data: DataConfig
    space: SpaceConfig
    strategy: Optional[StrategyConfig] = None
    model: Optional[ModelConfig] = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    plugins: list[str] = Field(
        default_factory=list, description="Python files (relative to this recipe) or modules that register "
        "spaces, strategies, datasets, losses, matchers or methods; imported before anything is built")
    then_retrain: Optional[str] = Field(
        None, description="retrain recipe run after a search on the derived genotype (path relative to this recipe)")
    source: Optional[str] = Field(None, description="file the recipe was loaded from (set by load_recipe)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v == "cuda" or v.startswith("cuda:") or v == "mps"):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {v!r}")
        return v

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (written into every run folder)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(path: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key {loc!r}")
        elif e["type"] == "missing":
            lines.append(f"{path}: missing required key {loc!r}")
        elif e["type"] == "value_error":  # a validator's own message names the key and the value
            lines.append(f"{path}: {loc}: {str(e['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"{path}: {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def read_yaml_mapping(path: str | os.PathLike, what: str = "recipe") -> dict[str, Any]:
    """The mapping a YAML ``what`` file (``"recipe"``, ``"study recipe"``) holds.

    Raises:
        RecipeError: the file is missing, is not valid YAML, or does not hold a mapping; the message names it.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{what} file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: YAML syntax error: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a {what} must be a mapping of keys, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Read and validate a YAML recipe.

    Args:
        path: the YAML file.
        overrides: dotted-key overrides applied before validation, e.g. ``{"optim.epochs": 2}``.

    Raises:
        RecipeError: missing/unreadable file, YAML syntax error, unknown key, wrong type, missing key,
            missing ``then_retrain`` file -- the message names the file and the key.
    """
    p = Path(path)
    raw = read_yaml_mapping(p, "recipe")
    if isinstance(raw.get("plugins"), list) and raw["plugins"]:
        # a plugin may register what the schema validates by name (an augmentation under data.augment)
        from nasreid.registry import RegistryError, load_plugins

        try:
            load_plugins([str(e) for e in raw["plugins"]], p.parent)
        except RegistryError as e:
            raise RecipeError(f"{p}: plugins: {e}") from None
    moved_sets = []
    for key, value in (overrides or {}).items():
        new = _moved_key(raw, key)
        if new != key:
            moved_sets.append(key.split(".")[-1])
        _set_dotted(raw, new, value)
    try:
        recipe = Recipe.model_validate({**raw, "source": str(p)})
    except ValidationError as e:
        raise RecipeError(_format_errors(str(p), e)) from None
    moved = [k for k in MOVED_LOSS_KEYS if k in (raw.get("loss") or {}) or k in moved_sets]
    if moved:
        _notice_moved(p, moved)
    if recipe.then_retrain:
        rp = Path(recipe.then_retrain)
        if not rp.is_absolute():  # relative to the recipe's folder, else to the current folder
            rp = p.parent / rp if (p.parent / rp).is_file() else rp
        if not rp.is_file():
            raise RecipeError(f"{p}: then_retrain: file not found: {recipe.then_retrain}")
        recipe.then_retrain = str(rp.resolve())  # absolute: the run folder's recipe.yaml works from anywhere
    if recipe.model and recipe.model.genotype and not Path(recipe.model.genotype).is_file():
        raise RecipeError(f"{p}: model.genotype: file not found: {recipe.model.genotype}")
    if recipe.model and recipe.model.pretrained and not Path(recipe.model.pretrained).expanduser().is_file():
        raise RecipeError(f"{p}: model.pretrained: weights file not found: {recipe.model.pretrained}")
    plugins = []
    for entry in recipe.plugins:
        q = Path(entry)
        if entry.endswith(".py") and not q.is_absolute():
            q = p.parent / q if (p.parent / q).is_file() else q
            if not q.is_file():
                raise RecipeError(f"{p}: plugins: file not found: {entry}")
            entry = str(q.resolve())
        plugins.append(entry)
    recipe.plugins = plugins
    return recipe


_NOTICED: set[str] = set()


def _notice_moved(path: Path, keys: list[str]) -> None:
    """One line, once per process: a recipe still holds the ``reid`` loss keys at their old place."""
    if "loss" in _NOTICED:
        return
    _NOTICED.add("loss")
    import logging

    logging.getLogger("nasreid").warning(
        "%s: %s moved to loss.kwargs (read from there; this notice is shown once)", path,
        ", ".join(f"loss.{k}" for k in keys))


def apply_overrides(recipe: Recipe, overrides: dict[str, Any], where: str = "overrides") -> Recipe:
    """A copy of ``recipe`` with dotted-key ``overrides`` applied and validated again (e.g. the
    ``recipe_key`` values of a searched sample, :func:`nasreid.mutables.recipe_overrides`).

    A key whose parent is ``None`` (an optional section switched off, such as ``data.augment.rsa``) is
    created with that section's defaults first.

    Raises:
        RecipeError: a key the schema does not know or a value it refuses; the message names ``where``
            and the key.
    """
    if not overrides:
        return recipe
    raw = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        key = _moved_key(raw, key)
        d = raw
        parts = key.split(".")
        for k in parts[:-1]:
            if d.get(k) is None:
                d[k] = {}
            d = d[k]
            if not isinstance(d, dict):
                raise RecipeError(f"{where}: {key!r}: {k!r} is not a mapping")
        d[parts[-1]] = value
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_errors(where, e)) from None


def _moved_key(raw: dict, key: str) -> str:
    """An override of a ``reid`` loss setting at its old place (``loss.triplet_weight``) goes to
    ``loss.kwargs.triplet_weight`` when the loss is ``reid``; for another loss it stays, and is refused."""
    parts = key.split(".")
    loss: dict[str, Any] = raw["loss"] if isinstance(raw.get("loss"), dict) else {}
    if len(parts) == 2 and parts[0] == "loss" and parts[1] in MOVED_LOSS_KEYS and loss.get("name", "reid") == "reid":
        return f"loss.kwargs.{parts[1]}"
    return key


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise RecipeError(f"override {dotted!r}: {k!r} is not a mapping")
    d[keys[-1]] = value


DEFAULT_DATA_DIR = "../shared/data"


def data_dir() -> Path:
    """Base folder of datasets: ``$NASREID_DATA``, else ``../shared/data`` (the project's shared data
    folder beside the repository)."""
    return Path(os.environ.get("NASREID_DATA") or DEFAULT_DATA_DIR)


def resolve_data_root(root: Optional[str]) -> Optional[str]:
    """Dataset root of a recipe: absolute paths and paths that exist from the current folder are used
    as they are; other relative paths are taken inside :func:`data_dir` (``$NASREID_DATA``);
    ``None`` stays ``None`` (the dataset parser then uses ``$NASREID_DATA/<its default folder>``)."""
    if root is None:
        return None
    r = Path(os.path.expandvars(os.path.expanduser(root)))
    if r.is_absolute() or r.exists():
        return str(r)
    return str(data_dir() / r)
