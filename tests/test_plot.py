import numpy as np
import pytest
from PIL import Image

from nasreid.plot import append_alphas_csv, log_alphas_tensorboard, plot_alpha_trajectories, read_alphas

LABELS = ("cell0.op", "cell1.kernel")
VALUES = ("conv3x3", "conv5x5", "skip", "zero")


def _probs(epoch, shift=0.0):
    out = {}
    for i, label in enumerate(LABELS):
        logits = np.array([epoch * (k + 1) * 0.3 + i + shift for k in range(len(VALUES))])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[label] = {v: float(x) for v, x in zip(VALUES, p)}
    return out


def _write_run(run_dir):
    csv = run_dir / "alphas.csv"
    for epoch in range(3):
        append_alphas_csv(csv, epoch, (epoch + 1) * 10, _probs(epoch, shift=5.0 if epoch == 2 else 0),
                          lam=5.0 - epoch if epoch else None)
    # "resume": epoch 2 is logged again and must replace, not duplicate
    append_alphas_csv(csv, 2, 30, _probs(2), lam=3.0)
    return csv


def test_append_and_read(tmp_path):
    csv = _write_run(tmp_path / "run1")
    assert csv.read_text().splitlines()[0] == "epoch,step,label,value,probability,lambda"
    df = read_alphas(csv)
    assert len(df) == 3 * 2 * 4
    assert not df.duplicated(["epoch", "label", "value"]).any()
    assert sorted(df["epoch"].unique()) == [0, 1, 2]
    assert np.isnan(df[df.epoch == 0]["lambda"]).all()
    assert (df[df.epoch == 2]["lambda"] == 3.0).all()
    sums = df.groupby(["epoch", "label"])["probability"].sum()
    assert np.allclose(sums, 1.0, atol=1e-6)
    e2 = df[(df.epoch == 2) & (df.label == LABELS[0])].set_index("value")["probability"]
    assert e2["zero"] == pytest.approx(_probs(2)[LABELS[0]]["zero"], rel=1e-6)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_alphas(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,step,label,value,lambda\n0,1,a,b,\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*probability"):
        read_alphas(bad)


def test_plot(tmp_path):
    run = tmp_path / "run1"
    _write_run(run)
    paths = plot_alpha_trajectories(run)
    names = sorted(p.name for p in paths)
    assert names == ["alpha_final.png", "alpha_final.svg",
                     "alpha_trajectories.png", "alpha_trajectories.svg"]
    for p in paths:
        assert p.parent == run and p.is_file() and p.stat().st_size > 0
    with Image.open(run / "alpha_trajectories.png") as im:
        assert im.size == (800, 300)  # 2 labels -> 1x2 grid of 4x3 in at 100 dpi
    with Image.open(run / "alpha_final.png") as im:
        im.load()
        assert im.size[0] > 0 and im.size[1] > 0
    assert "<svg" in (run / "alpha_trajectories.svg").read_text()[:2000]

    out = tmp_path / "figs"
    paths = plot_alpha_trajectories(run / "alphas.csv", out_dir=out, formats=("png",))
    assert [p.name for p in paths] == ["alpha_trajectories.png", "alpha_final.png"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError):
        plot_alpha_trajectories(run, formats=("bmp",))


def test_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tb"
    writer = SummaryWriter(log_dir=str(logdir))
    for step in range(3):
        log_alphas_tensorboard(writer, _probs(step), step)
    writer.close()

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert len(tags) == 8
    for step in range(3):
        for label in LABELS:
            for value in VALUES:
                events = acc.Scalars(f"alpha/{label}/{value}")
                assert [e.step for e in events] == [0, 1, 2]
                assert events[step].value == pytest.approx(_probs(step)[label][value], rel=1e-5)
