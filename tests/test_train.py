"""The trainer: exact resume, checkpoints and summary, the batch-of-one rule, config handling,
DDP with two gloo processes, and the loss guard. Runs on a tiny synthetic CT set at 32 px."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mutex_attn.data.datasets import load_dataset
from mutex_attn.train import TrainConfig, Trainer, load_checkpoint, train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory):
    from mutex_attn.data.synth_ct import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, patients=12, slices_per_patient=2, size=48, seed=0, progress=False)
    return out


def settings(data, out, **kw):
    base = dict(data=str(data), img_size=32, batch_size=4, epochs=2, max_steps_per_epoch=2,
                workers=0, progress=False, output=str(out))
    base.update(kw)
    return base


def quiet(*args):
    pass


@pytest.mark.parametrize("recipe", [{}, dict(optimizer="adamw", lr=1e-3, schedule="cosine", warmup_epochs=0.5)],
                         ids=["paper-sgd", "adamw-cosine-warmup"])
def test_resume_continues_exactly(tiny_ct, tmp_path, recipe):
    train(settings(tiny_ct, tmp_path / "straight", **recipe), log=quiet)

    def crash_after_first_epoch(line):
        if line.startswith("epoch"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_ct, tmp_path / "resumed", **recipe), log=crash_after_first_epoch)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 1
    # a different worker count must not matter: augmentation is seeded per (seed, epoch, index)
    train(resume=str(tmp_path / "resumed"), overrides={"workers": 1}, log=quiet)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa.keys() == sb.keys()
        for key in sa:  # SGD's momentum buffer; AdamW's step count and moments
            assert torch.equal(sa[key], sb[key]), key
    assert a["scheduler"] == b["scheduler"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def test_learning_rate_schedules(tiny_ct, tmp_path):
    from mutex_attn.train import lr_factor

    paper = TrainConfig(epochs=4, lr_half_life=2.0)
    assert [lr_factor(paper, 10)(s) for s in (0, 9, 10, 25, 39)] == pytest.approx(
        [1.0, 1.0, 0.5 ** 0.5, 0.5, 0.5 ** 1.5])  # eq. 17: constant within an epoch
    cosine = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1.0)
    f = lr_factor(cosine, 10)
    assert f(0) == pytest.approx(0.01)  # warm-up starts at 1 %
    assert f(5) == pytest.approx((0.01 + 0.99 * 0.5) * 0.5 * (1 + math.cos(math.pi * 5 / 40)))
    assert f(20) == pytest.approx(0.5) and f(40) == pytest.approx(0.0)
    # the scheduler steps per optimiser step: within the first epoch the lr ramps up
    trainer = Trainer(settings(tiny_ct, tmp_path / "run", optimizer="adamw", lr=1e-3, epochs=2,
                               schedule="cosine", warmup_epochs=1.0), log=quiet)
    assert trainer.steps_per_epoch == 2
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    lrs = []
    for _ in range(4):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == pytest.approx([1e-5, 1e-3 * (0.01 + 0.99 * 0.5) * 0.5 * (1 + math.cos(math.pi / 4)),
                                 1e-3 * 0.5, 1e-3 * 0.5 * (1 + math.cos(3 * math.pi / 4))])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-1)


def test_run_folder_contents(tiny_ct, tmp_path):
    out = tmp_path / "run"
    last, folder = train(settings(tiny_ct, out, epochs=3, lr_half_life=1.0), log=quiet)
    assert folder == out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.pt", "config.yaml", "curves.png", "last.pt", "summary.csv"]  # no temp files
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # lr · 0.5^(epoch / half_life), the paper's eq. 17, here with a half-life of one epoch
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.005, 0.0025])
    for r in rows:
        assert math.isfinite(float(r["train_loss"]))
        assert float(r["train_weight_ce"]) + float(r["train_weight_cs"]) == pytest.approx(1.0)
        assert 0.0 <= float(r["val_auc"]) <= 1.0
    assert float(last["train_loss"]) == pytest.approx(float(rows[-1]["train_loss"]))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert TrainConfig.from_dict(saved) == TrainConfig.from_dict(settings(tiny_ct, out, epochs=3, lr_half_life=1.0))
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["config"]["model"] == "manet_resnet50" and 1 <= ckpt["epoch"] <= 3


def test_a_last_batch_of_one_is_dropped(tiny_ct, tmp_path):
    n = len(load_dataset(tiny_ct, "train"))
    trainer = Trainer(settings(tiny_ct, tmp_path / "run", batch_size=n - 1, epochs=1,
                               max_steps_per_epoch=None, val_split=""), log=quiet)
    assert len(trainer.loader) == 1  # the lone last sample would crash BatchNorm in training
    trainer.fit()
    trainer = Trainer(settings(tiny_ct, tmp_path / "run2", batch_size=n - 2, epochs=1,
                               val_split=""), log=quiet)
    assert len(trainer.loader) == 2  # a last batch of two is kept


def test_baseline_trains_with_plain_cross_entropy(tiny_ct, tmp_path):
    last, _ = train(settings(tiny_ct, tmp_path / "run", model="resnet50", epochs=1), log=quiet)
    assert math.isfinite(last["train_loss"]) and "train_weight_ce" not in last


def test_resume_refuses_to_change_the_recipe(tiny_ct, tmp_path):
    train(settings(tiny_ct, tmp_path / "run", epochs=1), log=quiet)
    with pytest.raises(ValueError, match="cannot change lr"):
        train(resume=str(tmp_path / "run"), overrides={"lr": 0.1}, log=quiet)


def test_resume_realigns_the_schedule_with_the_steps_per_epoch(tiny_ct, tmp_path):
    """A version-1 checkpoint counted epochs in its scheduler (and a resumed run may have other
    steps per epoch): resuming sets the step from the epoch, so the run continues exactly."""
    from mutex_attn.train import save_atomic

    recipe = dict(lr_half_life=1.0)
    train(settings(tiny_ct, tmp_path / "straight", epochs=3, **recipe), log=quiet)
    train(settings(tiny_ct, tmp_path / "old", epochs=1, **recipe), log=quiet)
    old = load_checkpoint(tmp_path / "old")
    old["version"] = 1
    old["scheduler"]["last_epoch"] = old["epoch"]  # what a version-1 trainer saved
    save_atomic({k: v for k, v in old.items() if k != "path"}, tmp_path / "old" / "last.pt")
    trainer = Trainer(resume=str(tmp_path / "old"), overrides={"epochs": 3}, log=quiet)
    assert trainer.scheduler.last_epoch == trainer.steps_per_epoch
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    trainer.fit()
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "old")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize("change, message", [
    ({"model": "vgg"}, "model must be one of"),
    ({"loss": "focal"}, "loss must be one of"),
    ({"blocks": "fab"}, "blocks must be one of"),
    ({"amp": "fp8"}, "amp must be one of"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"batch_size": 1}, "batches of at least 2"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"colour": 1}, "unknown training setting"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"data": "x", **change})


def test_a_non_finite_loss_stops_the_run_without_saving(tiny_ct, tmp_path):
    trainer = Trainer(settings(tiny_ct, tmp_path / "run", epochs=1), log=quiet)
    real = trainer.criterion

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        return parts._replace(loss=parts.loss * float("nan"))

    trainer.criterion = poisoned
    with pytest.raises(FloatingPointError, match="the loss became nan at epoch 1, step 1"):
        trainer.fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_two_gloo_processes_under_torchrun(tiny_ct, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "mutex_attn", "train", "--data", str(tiny_ct),
           "--img-size", "32", "-b", "2", "--epochs", "1", "--max-steps-per-epoch", "3",
           "--workers", "0", "--no-progress", "--output", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "2 process(es) on cpu" in run.stdout
    assert "all 2 processes hold identical weights" in run.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 1 and math.isfinite(ckpt["history"][0]["train_loss"])
