"""Size, cost and measured speed of a fixed network: parameters, multiply-adds and inference latency.

:func:`profile_network` reports, for one architecture (a genotype, a preset of a space, a retrain run folder
or any ``nn.Module``):

* ``params``: all parameters; ``params_no_classifier``: without the identity classifier (what is deployed);
* ``macs``: multiply-adds of one ``[1, 3, H, W]`` image (convolutions and linear layers only, the OSNet
  paper's convention; :func:`nasreid.models.complexity.count_multiply_adds`);
* ``latency``: for every device and batch size, the wall-clock time of one forward pass of a batch in eval
  mode under ``torch.inference_mode()``, measured ``iters`` times after ``warmup`` untimed passes: median,
  90th percentile (linear interpolation), mean and minimum in milliseconds per batch, and images per second
  (``batch / median``). On CUDA every timed pass is bracketed by ``torch.cuda.synchronize()``, with
  ``cudnn.benchmark`` on (as in training), and the peak memory of the pass is recorded.
* ``environment``: torch / Python versions, platform, CPU model, torch's intra-op thread count, CUDA and
  cuDNN versions, and the name of every device measured.

:func:`format_profile` prints a report as a small aligned table. The report is plain JSON-ready data.

Inputs are random normal images (``torch.randn``, seed 0): latency does not depend on the pixel values of
these networks.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

import numpy as np
import torch
from torch import nn

from nasreid.errors import NasreidError, RunFolderError
from nasreid.genotype import Genotype, preset_genotype

__all__ = ["ProfileError", "profile_network", "format_profile", "cpu_name"]

DEFAULT_INPUT_SIZE = (256, 128)


class ProfileError(NasreidError, ValueError):
    """A bad argument of :func:`profile_network` (a preset without ``space``, an unknown device, a batch size
    below 1, ...) or a network that fails on the requested input size; the message names the argument."""


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s ``model name`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(name + "." for name, _ in model.named_modules() if name.split(".")[-1] == "classifier")


def _resolve(genotype_or_model, space: Optional[str], num_classes: int):
    """``(model, description dict, default input size or None)``."""
    if isinstance(genotype_or_model, nn.Module):
        return genotype_or_model, {"source": type(genotype_or_model).__name__}, None
    size = None
    source = genotype_or_model
    if isinstance(genotype_or_model, Genotype):
        geno = genotype_or_model
        source = "<Genotype>"
    elif isinstance(genotype_or_model, (str, os.PathLike)):
        s = os.fspath(genotype_or_model)
        if isinstance(genotype_or_model, str) and s.startswith("preset:"):
            name = s.split(":", 1)[1]
            if not space:
                raise ProfileError(f"{s!r}: a preset needs space= (e.g. space='osnet_ain'; nasreid list spaces)")
            if not name:
                raise ProfileError(f"{s!r}: give a preset name after 'preset:'")
            try:
                geno = preset_genotype(space, name)
            except ModuleNotFoundError as e:
                raise ProfileError(f"space={space!r}: no such search space ({e})") from None
        else:
            p = Path(s)
            if p.is_dir():
                from nasreid.engine.runs import load_run_recipe

                if not (p / "genotype.json").is_file():
                    raise RunFolderError(f"{p} is not a run folder with a genotype: genotype.json is missing")
                geno = Genotype.load(p / "genotype.json")
                if (p / "recipe.yaml").is_file():
                    recipe = load_run_recipe(p)
                    size = (recipe.data.height, recipe.data.width)
            elif p.is_file():
                geno = Genotype.load(p)
            else:
                raise ProfileError(f"{s!r} is neither a genotype.json file, a run folder nor 'preset:<name>'")
    else:
        raise ProfileError("genotype_or_model must be a Genotype, a genotype.json path, 'preset:<name>', a run "
                           f"folder or an nn.Module, got {type(genotype_or_model).__name__}")
    if space and geno.space != space:
        raise ProfileError(f"space={space!r} but the genotype is of space {geno.space!r}")
    model = geno.build(num_classes=num_classes)
    desc = {"source": str(source), "space": geno.space, "choices": dict(geno.choices),
            "space_kwargs": dict(geno.space_kwargs)}
    return model, desc, size


def _devices(devices) -> list[str]:
    if devices is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if isinstance(devices, str):
        devices = [devices]
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise ProfileError(f"devices: {d!r} is not a device ({e})") from None
        if dev.type not in ("cpu", "cuda"):
            raise ProfileError(f"devices: {d!r}: only 'cpu' and 'cuda[:N]' can be profiled")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ProfileError(f"devices: {d!r} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ProfileError(f"devices: {d!r}: only {torch.cuda.device_count()} CUDA device(s)")
        if str(d) not in out:
            out.append(str(d))
    if not out:
        raise ProfileError("devices is empty")
    return out


def _int_arg(v, name: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ProfileError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def _time_batches(model: nn.Module, x: torch.Tensor, dev: torch.device, warmup: int, iters: int,
                  amp: bool) -> tuple[list[float], Optional[float]]:
    """Milliseconds of ``iters`` timed forward passes, and the peak CUDA memory in MiB (None on CPU)."""
    cuda = dev.type == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.float16) if (cuda and amp) else torch.autocast("cpu", enabled=False)
    times = []
    with torch.inference_mode(), ctx:
        for _ in range(warmup):
            model(x)
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(iters):
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - t0) * 1000.0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None
    return times, peak


def profile_network(genotype_or_model: Union[Genotype, str, os.PathLike, nn.Module], *, space: Optional[str] = None,
                    input_size: Optional[Sequence[Optional[int]]] = None, batch_sizes: Sequence[int] = (1, 64),
                    devices: Optional[Sequence[str]] = None, warmup: int = 3, iters: int = 10, num_classes: int = 0,
                    amp: bool = False, channels_last: bool = False, threads: Optional[int] = None) -> dict[str, Any]:
    """Parameters, multiply-adds per image and measured inference latency of a network.

    Args:
        genotype_or_model: a :class:`~nasreid.genotype.Genotype`; a ``genotype.json`` path; ``"preset:<name>"``
            (a preset of ``space``, see :func:`nasreid.genotype.preset_genotype`); a run folder (its
            ``genotype.json``, and its recipe's ``data.height`` / ``data.width`` as the default input size);
            or an ``nn.Module`` mapping ``[B, 3, H, W]`` images to anything (it is put in eval mode and moved
            to each device; its device and train/eval mode are restored afterwards).
        space: search space of a preset (required for ``"preset:<name>"``); for a genotype, a check that it
            belongs to that space.
        input_size: ``(height, width)`` in pixels; default the run's input size for a run folder, else
            ``(256, 128)``. A ``None`` entry takes that default's value.
        batch_sizes: images per timed batch (each >= 1).
        devices: e.g. ``["cpu", "cuda"]``; default ``["cpu"]`` plus ``"cuda"`` when available.
        warmup: untimed passes before timing (>= 0); iters: timed passes (>= 1).
        num_classes: identity classifier size of the built network (0: none; a run's classifier does not
            change the features, and ``params_no_classifier`` excludes it anyway). Ignored for an nn.Module.
        amp: float16 autocast; channels_last: ``torch.channels_last`` model and input. Both only on CUDA
            (recorded as False for CPU entries).
        threads: torch intra-op CPU threads while profiling (default: leave torch's setting); restored after.

    Returns:
        ``{"model": {source, space, choices, space_kwargs}, "input_size": [H, W], "num_classes",
        "params", "params_no_classifier" (counts), "macs" (multiply-adds per image),
        "latency": [{"device", "device_name", "batch_size", "amp", "channels_last", "warmup", "iters",
        "median_ms", "p90_ms", "mean_ms", "min_ms" (milliseconds per batch), "images_per_s",
        "peak_memory_mib" (CUDA, else None)}, ...] (devices outer, batch sizes inner),
        "environment": {"torch", "python", "platform", "cpu", "threads", "cuda", "cudnn", "devices"}}``.

    Raises:
        ProfileError (a ``ValueError``): a preset without ``space``, an unknown space, a space that does not
            match the genotype, a path that is neither a genotype file nor a run folder, bad ``input_size`` /
            ``batch_sizes`` / ``warmup`` / ``iters`` / ``threads``, an unavailable or unknown device, or a
            network that fails on the input size.
        GenotypeError: an unreadable genotype or a preset the space does not have.
        RunFolderError: a folder without ``genotype.json``. RecipeError: a run folder with a bad recipe.
        torch.cuda.OutOfMemoryError: a batch does not fit on the GPU.
    """
    from nasreid.models.complexity import count_multiply_adds, count_parameters

    if not isinstance(batch_sizes, (list, tuple)) or not batch_sizes:
        raise ProfileError(f"batch_sizes must be a non-empty list of integers, got {batch_sizes!r}")
    batch_sizes = [_int_arg(b, "batch_sizes", 1) for b in batch_sizes]
    warmup = _int_arg(warmup, "warmup", 0)
    iters = _int_arg(iters, "iters", 1)
    if threads is not None:
        threads = _int_arg(threads, "threads", 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
        raise ProfileError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    devs = _devices(devices)

    model, desc, run_size = _resolve(genotype_or_model, space, int(num_classes))
    default = run_size or DEFAULT_INPUT_SIZE
    if input_size is None:
        input_size = default
    if not isinstance(input_size, (list, tuple)) or len(input_size) != 2:
        raise ProfileError(f"input_size must be (height, width), got {input_size!r}")
    size = cast(tuple[int, int],  # two entries: checked above
                tuple(default[i] if v is None else _int_arg(v, "input_size", 1) for i, v in enumerate(input_size)))

    given = isinstance(genotype_or_model, nn.Module)
    try:
        orig_device = next(model.parameters()).device
    except StopIteration:
        orig_device = torch.device("cpu")
    was_training = model.training
    old_threads = torch.get_num_threads()
    old_bench = torch.backends.cudnn.benchmark
    latency = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model = model.to("cpu").eval()
        params = count_parameters(model)
        params_nc = count_parameters(model, exclude=_classifier_prefixes(model))
        try:
            macs = count_multiply_adds(model, size)
        except RuntimeError as e:
            raise ProfileError(f"input_size={size}: the network fails on a [1, 3, {size[0]}, {size[1]}] input: "
                               f"{str(e).splitlines()[0]}") from None
        gen = torch.Generator().manual_seed(0)
        for d in devs:
            dev = torch.device(d)
            cuda = dev.type == "cuda"
            cl, use_amp = channels_last and cuda, amp and cuda
            if cuda:
                torch.backends.cudnn.benchmark = True
            model = model.to(dev)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            for b in batch_sizes:
                x = torch.randn(b, 3, *size, generator=gen).to(dev)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                times, peak = _time_batches(model, x, dev, warmup, iters, use_amp)
                del x
                t = np.asarray(times)
                med = float(np.median(t))
                latency.append({"device": d, "device_name": _device_name(dev), "batch_size": b, "amp": use_amp,
                                "channels_last": cl, "warmup": warmup, "iters": iters, "median_ms": med,
                                "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(t.mean()),
                                "min_ms": float(t.min()), "images_per_s": b * 1000.0 / med if med > 0 else None,
                                "peak_memory_mib": peak})
            if cl:
                model = model.to(memory_format=torch.contiguous_format)
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench
        if given:
            model.to(orig_device).train(was_training)
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu_name(), "threads": threads_used,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "devices": {d: _device_name(torch.device(d)) for d in devs},
    }
    return {"model": desc, "input_size": list(size), "num_classes": int(num_classes) if not given else None,
            "params": int(params), "params_no_classifier": int(params_nc), "macs": int(macs), "latency": latency,
            "environment": env}


def _human(n: float, unit: str = "") -> str:
    for k, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= k:
            return f"{n / k:.2f} {s}{unit}"
    return f"{n:g} {unit}".rstrip()


def format_profile(report: dict[str, Any]) -> str:
    """A report of :func:`profile_network` as text: a header (network, input size, parameters and
    multiply-adds as exact counts with thousands separators and in M/G, environment) and one aligned row per
    (device, batch size): median and p90 milliseconds per batch (2 decimals), images/s (1 decimal).

    Raises:
        KeyError: ``report`` lacks a field of :func:`profile_network`'s report.
    """
    m = report["model"]
    env = report["environment"]
    name = m.get("source", "?")
    if m.get("space") and m.get("space") not in str(name):
        name = f"{name} (space {m['space']})"
    h, w = report["input_size"]
    lines = [
        f"network   {name}",
        f"input     {h}x{w} (height x width)",
        f"params    {report['params']:,} ({_human(report['params'])}); without classifier "
        f"{report['params_no_classifier']:,} ({_human(report['params_no_classifier'])})",
        f"MACs      {report['macs']:,} ({_human(report['macs'])}) multiply-adds per image",
        f"torch     {env['torch']}, {env['threads']} CPU thread(s), CPU {env['cpu']}",
    ]
    for d, n in env.get("devices", {}).items():
        if not str(d).startswith("cpu"):
            lines.append(f"device    {d}: {n} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})")
    header = ["device", "batch", "amp", "ch_last", "median ms", "p90 ms", "images/s"]
    rows = [[e["device"], str(e["batch_size"]), "yes" if e["amp"] else "no", "yes" if e["channels_last"] else "no",
             f"{e['median_ms']:.2f}", f"{e['p90_ms']:.2f}",
             f"{e['images_per_s']:.1f}" if e["images_per_s"] is not None else "-"] for e in report["latency"]]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths)))

    lines += ["", fmt(header), fmt(["-" * wd for wd in widths])] + [fmt(r) for r in rows]
    if report["latency"]:
        e = report["latency"][0]
        lines.append(f"(latency: milliseconds per batch over {e['iters']} timed runs after {e['warmup']} warm-up "
                     "runs, eval mode, torch.inference_mode)")
    return "\n".join(lines)
