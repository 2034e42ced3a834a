"""`mutex-attn train`: train MA-Net (or a baseline) on a CT dataset.

The paper's recipe is the default: 224 px, SGD lr 0.01, momentum 0.9, lr · 0.5^(epoch/30),
batch 16, 120 epochs, flips and rotation. AdamW, a cosine schedule and a linear warm-up are
options for short runs from scratch (the CPU demo). One process per GPU under `torchrun` (DDP, NCCL);
the same code on CPU (gloo), or as a single process.

Everything random is a function of the seed and the epoch (sample order, mutex partners,
augmentation), so `--resume` continues a run exactly where it stopped. The run folder holds
config.yaml, summary.csv (a row per epoch) and the checkpoints last.pt and best.pt, each
written to a temporary file and renamed, so a crash never leaves a torn file behind.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from mutex_attn.losses import MODES as LOSS_MODES
from mutex_attn.losses import AdaptiveMutexLoss
from mutex_attn.models import BLOCKS, MODEL_NAMES, MUTEX_MODELS, create_model

CHECKPOINT_VERSION = 2  # 2: the lr scheduler steps once per optimiser step (1: per epoch; still resumes)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BEST_METRICS = ("auc", "patient_auc", "accuracy", "loss")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("halving", "cosine")


@dataclass
class TrainConfig:
    """Every setting of a run; saved in config.yaml and in each checkpoint."""

    data: str | None = None  # dataset root (see mutex_attn.data.datasets)
    dataset: str = "auto"  # covid-ct | sars-cov-2 | nifti | folder | auto
    model: str = "manet_resnet50"
    pretrained: str | None = None  # "imagenet" (local torch hub cache) or a weights file
    epochs: int = 120
    batch_size: int = 16
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    weight_decay: float = 0.0
    schedule: str = "halving"  # halving: lr · 0.5^(epoch / lr_half_life), the paper's eq. 17 | cosine
    lr_half_life: float = 30.0
    warmup_epochs: float = 0.0  # linear warm-up from lr / 100, step by step
    img_size: int = 224
    augment: bool = True  # horizontal and vertical flips, random rotation
    rotation: float = 15.0  # degrees
    loss: str = "adaptive"  # ce | equal | adaptive (MA-Net only)
    blocks: str = "mab+fab"  # mab+fab | mab | none (MA-Net only)
    backend: str = "auto"  # operator backend of the attention blocks
    amp: str | None = None  # bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    clip_grad: float | None = None  # max gradient norm
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    output: str | None = None  # run folder (default runs/<model>-<time>)
    val_split: str = "val"
    best_metric: str = "auc"  # which validation number picks best.pt
    val_fraction: float = 0.15  # for datasets without fixed splits
    test_fraction: float = 0.25
    on_error: str = "raise"  # raise | skip: unreadable images
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke runs)
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def choose(name, value, choices):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")

        choose("model", self.model, MODEL_NAMES)
        choose("loss", self.loss, LOSS_MODES)
        choose("blocks", self.blocks, BLOCKS)
        choose("amp", self.amp, (None, *AMP_DTYPES))
        choose("best_metric", self.best_metric, BEST_METRICS)
        choose("optimizer", self.optimizer, OPTIMIZERS)
        choose("schedule", self.schedule, SCHEDULES)
        choose("on_error", self.on_error, ("raise", "skip"))
        for name in ("epochs", "batch_size", "img_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.batch_size < 2 and self.model in MUTEX_MODELS:
            raise ValueError("MA-Net trains with batches of at least 2 (its gate network uses BatchNorm)")
        if not self.lr > 0 or self.lr_half_life <= 0 or self.workers < 0 or self.warmup_epochs < 0:
            raise ValueError("lr and lr_half_life must be > 0, workers and warmup_epochs >= 0")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0; got {self.clip_grad}")

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(cls.fields())}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings a resumed run may change; changing any other would not continue the same run.
RESUMABLE_CHANGES = ("epochs", "workers", "progress", "device", "output", "data")


# --- distributed -------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


# --- files -------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """Open a temporary file beside `path`; on success it is flushed to disk and renamed over
    `path`, so readers (and a crash) only ever see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_csv_atomic(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """A CSV of dict rows; columns default to every key, in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def load_checkpoint(path) -> dict:
    """A checkpoint written by the trainer (a run folder means its last.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a mutex_attn training checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt: dict, backend: str | None = None) -> tuple[nn.Module, TrainConfig]:
    """The trained model (eval mode, on CPU) and the config it was trained with."""
    config = TrainConfig.from_dict(ckpt["config"])
    model = create_model(
        config.model, pretrained=False, backend=backend or config.backend, blocks=config.blocks
    )
    model.load_state_dict(ckpt["model"])
    return model.eval(), config


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# --- data --------------------------------------------------------------------------------------

def build_datasets(config: TrainConfig):
    """(train dataset yielding (x, y) or mutex quadruples, validation SliceDataset or None)."""
    from mutex_attn.data import MutexPairDataset, SeededTransform
    from mutex_attn.data.datasets import SliceDataset, load_dataset
    from mutex_attn.data.transforms import eval_transform, train_transform

    if not config.data:
        raise ValueError("no dataset: pass --data DIR (e.g. one made by `mutex-attn synth --out DIR`)")
    load = dict(
        kind=config.dataset, on_error=config.on_error, seed=config.seed,
        val_fraction=config.val_fraction, test_fraction=config.test_fraction,
    )
    train_slices = load_dataset(config.data, "train", **load)
    train = SeededTransform(
        SliceDataset(train_slices),
        train_transform(config.img_size, config.rotation, config.augment),
        seed=config.seed,
    )
    if config.model in MUTEX_MODELS:
        train = MutexPairDataset(train, seed=config.seed)
    val = None
    if config.val_split:
        val_slices = load_dataset(config.data, config.val_split, **load)
        val = SliceDataset(val_slices, transform=eval_transform(config.img_size))
    return train, val


def _set_epoch(dataset, epoch: int) -> None:
    """Tell every wrapper layer (pairing, augmentation) which epoch it is."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        dataset = getattr(dataset, "dataset", None)


# --- evaluation inside training ----------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, loader, device, amp: str | None = None, channels_last=False,
            progress: bool = False, desc: str = "predict"):
    """(P(COVID) per image, labels, mean cross-entropy) of the plain backbone path."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp is not None)
    try:
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            probs.append(torch.softmax(logits, 1)[:, 1].cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    probs = torch.cat(probs).numpy() if probs else torch.empty(0).numpy()
    labels = torch.cat(labels).numpy() if labels else torch.empty(0, dtype=torch.long).numpy()
    return probs, labels, loss_sum / max(len(labels), 1)


def validation_metrics(model, dataset, config: TrainConfig, device, dist_info: Dist) -> dict:
    from mutex_attn.metrics import aggregate_patients, binary_metrics

    loader = DataLoader(dataset, batch_size=config.batch_size * 2, num_workers=config.workers)
    probs, labels, loss = predict(
        model, loader, device, config.amp, config.channels_last,
        progress=config.progress and dist_info.main, desc="validate",
    )
    keys = ("val_loss", "val_accuracy", "val_sensitivity", "val_specificity", "val_f1", "val_auc",
            "val_patient_accuracy", "val_patient_auc")
    bad = int((~np.isfinite(probs)).sum())
    if bad:  # e.g. BatchNorm running statistics of a model a few steps old: not worth a crash
        warnings.warn(f"validation: the model's outputs are not finite for {bad} of {len(probs)} "
                      "images; this epoch's validation metrics are NaN")
        return dict.fromkeys(keys, math.nan)
    slice_m = binary_metrics(labels, probs)
    y_p, s_p, _ = aggregate_patients(labels, probs, dataset.patients, rule="mean")
    patient_m = binary_metrics(y_p, s_p)
    return {
        "val_loss": loss, "val_accuracy": slice_m["accuracy"], "val_sensitivity": slice_m["sensitivity"],
        "val_specificity": slice_m["specificity"], "val_f1": slice_m["f1"], "val_auc": slice_m["auc"],
        "val_patient_accuracy": patient_m["accuracy"], "val_patient_auc": patient_m["auc"],
    }


def _score(metrics: dict, best_metric: str) -> float:
    """Bigger is better; NaN (e.g. AUC of a one-class set) never counts as best."""
    value = metrics.get("val_" + best_metric, float("nan"))
    return -value if best_metric == "loss" else value


def lr_factor(config: TrainConfig, steps_per_epoch: int):
    """The learning-rate multiplier as a function of the optimiser step: the paper's halving
    per epoch (eq. 17) or a cosine decay to zero over the run, times a linear ramp from 1 % to
    1 over the first `warmup_epochs` (the decay already runs during the warm-up, so a cosine
    run peaks slightly below lr). summary.csv's lr is the rate at each epoch's first step."""
    steps_per_epoch = max(int(steps_per_epoch), 1)
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if config.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
        else:
            decay = 0.5 ** ((step // steps_per_epoch) / config.lr_half_life)
        if step < warmup:
            decay *= 0.01 + 0.99 * step / warmup
        return decay

    return factor


# --- the trainer -------------------------------------------------------------------------------

class Trainer:
    """One training run. `config` (a TrainConfig or a dict of settings) starts a new run;
    `resume` (a checkpoint or run folder) continues a saved one, with `overrides` limited to
    RESUMABLE_CHANGES."""

    def __init__(self, config: TrainConfig | dict | None = None, *, resume: str | None = None,
                 overrides: dict | None = None, log=print):
        self.log_fn = log
        ckpt = None
        if resume:
            ckpt = load_checkpoint(resume)
            overrides = {"output": str(Path(ckpt["path"]).parent), **(overrides or {})}
            config = _resumed_config(TrainConfig.from_dict(ckpt["config"]), overrides)
        elif config is None or isinstance(config, dict):
            config = TrainConfig.from_dict({**(config or {}), **(overrides or {})})
        if config.output is None:
            config = dataclasses.replace(config, output=_default_output(config))
        self.config = config
        self.device = pick_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = setup_distributed(self.device)
        torch.manual_seed(config.seed)

        self.train_set, self.val_set = build_datasets(config)
        self.mutex = config.model in MUTEX_MODELS
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=self.dist.world, rank=self.dist.rank,
            shuffle=True, seed=config.seed,
        )
        shard = len(self.sampler)
        if shard < 2:
            raise ValueError(f"each process needs >= 2 training samples; this one gets {shard}")
        # A last batch of one sample would crash BatchNorm in training mode: drop it instead.
        self.loader = DataLoader(
            self.train_set, batch_size=config.batch_size, sampler=self.sampler,
            num_workers=config.workers, drop_last=shard % config.batch_size == 1,
            pin_memory=self.device.type == "cuda", persistent_workers=config.workers > 0,
        )

        model = create_model(
            config.model, pretrained=_pretrained_arg(config.pretrained),
            backend=config.backend, blocks=config.blocks,
        ).to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.core = model
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                model.parameters(), lr=config.lr, betas=(config.momentum, 0.999),
                weight_decay=config.weight_decay,
            )
        else:
            self.optimizer = torch.optim.SGD(
                model.parameters(), lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay,
            )
        self.steps_per_epoch = len(self.loader)
        if config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        # Stepped once per optimiser step, so that a warm-up can ramp within an epoch.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(config, self.steps_per_epoch)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.criterion = AdaptiveMutexLoss(config.loss)
        self.start_epoch, self.best_score, self.history = 0, -math.inf, []
        if ckpt is not None:
            self._restore(ckpt)

        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.model = torch.compile(model) if config.compile else model

        self.out = Path(config.output)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml

            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    def log(self, *args) -> None:
        if self.dist.main:
            self.log_fn(*args)

    # -- checkpoints --

    def _restore(self, ckpt: dict) -> None:
        self.core.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        # The schedule is a function of the optimiser step, and checkpoints are written at epoch
        # ends: set the step from the epoch and this run's steps per epoch. That is what was
        # saved, unless the steps per epoch changed (another process count or dataset) or the
        # checkpoint is version 1 (its scheduler counted epochs).
        step = self.start_epoch * self.steps_per_epoch
        self.scheduler.last_epoch = step
        factor = self.scheduler.lr_lambdas[0](step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.best_score = float(ckpt["best_score"])
        self.history = list(ckpt["history"])
        self.log(f"resumed from {ckpt['path']} after epoch {self.start_epoch}")

    def _checkpoint(self, epoch: int) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_score": self.best_score,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }

    # -- one epoch --

    def _step(self, batch) -> dict[str, torch.Tensor]:
        config, device = self.config, self.device
        batch = [t.to(device, non_blocking=True) for t in batch]
        if config.channels_last:
            batch = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch]
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(config.amp, torch.float32),
                            enabled=config.amp is not None):
            if self.mutex:
                x, y, x_mutex, y_mutex = batch
                parts = self.criterion(self.model(x, x_mutex), y, y_mutex, return_parts=True)
                stats = {"loss": parts.loss, "ce": parts.ce, "cs": parts.cs,
                         "weight_ce": parts.weight_ce, "weight_cs": parts.weight_cs}
            else:
                x, y = batch
                loss = F.cross_entropy(self.model(x).float(), y)
                stats = {"loss": loss, "ce": loss}
        loss = stats["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.clip_grad if self.config.clip_grad else math.inf
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.core.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {k: v.detach().float() for k, v in stats.items()}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm.auto import tqdm

        self.model.train()
        self.sampler.set_epoch(epoch)
        _set_epoch(self.train_set, epoch)
        sums: dict[str, torch.Tensor] = {}
        steps = self.steps_per_epoch
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                   disable=not (self.config.progress and self.dist.main), dynamic_ncols=True)
        n = 0
        for step, batch in enumerate(self.loader):
            if step >= steps:
                break
            stats = self._step(batch)
            loss = stats["loss"].item()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; the last good "
                    f"checkpoint is {self.out / 'last.pt'}. Try a lower --lr or --clip-grad 5"
                )
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        names = sorted(sums)
        totals = torch.stack([sums[k] for k in names] + [torch.tensor(float(n))]).to(self.device)
        if self.dist.enabled:  # mean over every step of every process
            dist.all_reduce(totals)
        return {f"train_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(names)}

    # -- the run --

    def fit(self) -> dict:
        config = self.config
        self.log(
            f"training {config.model} ({'blocks ' + config.blocks + ', loss ' + config.loss if self.mutex else 'baseline'}) "
            f"on {len(self.train_set)} images for epochs {self.start_epoch + 1}..{config.epochs}; "
            f"{self.dist.world} process(es) on {self.device}; output {self.out}"
        )
        for epoch in range(self.start_epoch, config.epochs):
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch + 1, "lr": lr, **self.train_epoch(epoch)}
            improved = False
            if self.dist.main:
                if self.val_set is not None:
                    row.update(validation_metrics(unwrap(self.model), self.val_set, config, self.device, self.dist))
                    score = _score(row, config.best_metric)
                    improved = not self.history or score > self.best_score
                    if improved and not math.isnan(score):
                        self.best_score = score
                row["seconds"] = time.perf_counter() - t0
                self.history.append(row)
                ckpt = self._checkpoint(epoch + 1)
                save_atomic(ckpt, self.out / "last.pt")
                if improved or self.val_set is None:
                    save_atomic(ckpt, self.out / "best.pt")
                write_csv_atomic(self.out / "summary.csv", self.history)  # whole, so it matches last.pt
                self.log(_epoch_line(row, config.epochs, improved))
            if self.dist.enabled:
                dist.barrier()
        self._check_replicas_agree()
        if self.dist.main and self.history:
            try:
                from mutex_attn.metrics import plot_training_curves

                plot_training_curves(self.out / "summary.csv", self.out / "curves.png")
            except Exception as e:  # a plot must never cost the run
                self.log(f"could not draw curves.png: {e}")
        return self.history[-1] if self.history else {}

    def _check_replicas_agree(self) -> None:
        """DDP keeps every process's weights equal; check it rather than trust it."""
        if not self.dist.enabled:
            return
        with torch.no_grad():
            total = torch.stack([p.double().sum() for p in self.core.parameters()]).sum().reshape(1)
            gathered = [torch.zeros_like(total) for _ in range(self.dist.world)]
            dist.all_gather(gathered, total)
        values = [g.item() for g in gathered]
        if any(v != values[0] for v in values):
            raise RuntimeError(f"processes ended with different weights: checksums {values}")
        self.log(f"all {self.dist.world} processes hold identical weights (checksum {values[0]:.6e})")


def _epoch_line(row: dict, epochs: int, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if "train_weight_ce" in row:
        parts.append(f"a1/a2 {row['train_weight_ce']:.2f}/{row['train_weight_cs']:.2f}")
    for key, name in (("val_loss", "val loss"), ("val_accuracy", "acc"), ("val_auc", "AUC"),
                      ("val_patient_auc", "patient AUC")):
        if key in row:
            parts.append(f"{name} {row[key]:.3f}")
    parts.append(f"{row['seconds']:.0f}s" + (" *" if improved else ""))
    return " | ".join(parts)


def _resumed_config(saved: TrainConfig, asked: dict) -> TrainConfig:
    """The saved config, with the changes a resumed run may make (others are an error)."""
    values = saved.to_dict()
    for key, value in asked.items():
        if key in RESUMABLE_CHANGES:
            values[key] = value
        elif values.get(key) != value:
            raise ValueError(
                f"--resume continues the saved run; it cannot change {key} "
                f"(saved {values.get(key)!r}, asked {value!r}). Allowed: {', '.join(RESUMABLE_CHANGES)}"
            )
    if saved.schedule == "cosine" and values["epochs"] != saved.epochs:
        warnings.warn(f"the cosine schedule now decays over {values['epochs']} epochs instead of "
                      f"{saved.epochs}: the epochs already run followed the old length")
    return TrainConfig.from_dict(values)


def _pretrained_arg(pretrained: str | None):
    if pretrained in (None, "", "none"):
        return False
    return True if pretrained == "imagenet" else pretrained


def _default_output(config: TrainConfig) -> str:
    return str(Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: TrainConfig | dict | None = None, *, resume: str | None = None,
          overrides: dict | None = None, log=print) -> tuple[dict, Path]:
    """Train one run; returns (the last epoch's summary row, the run folder)."""
    trainer = Trainer(config, resume=resume, overrides=overrides, log=log)
    try:
        last = trainer.fit()
    except KeyboardInterrupt:
        trainer.log(f"interrupted; continue with: mutex-attn train --resume {trainer.out / 'last.pt'}")
        raise
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return last, trainer.out
