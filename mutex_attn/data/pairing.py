"""Mutex pairs: every training sample is paired with a random sample of another class.

The partner of sample i in epoch e is drawn from a generator seeded with (seed, e, i), so a
run is reproducible whatever the number of DataLoader workers, and partners change per epoch
(call `set_epoch`). The partner is fetched through the wrapped dataset, so it gets its own,
independent augmentation. Class imbalance is fine: the partner is uniform over the other
class, however small it is.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def _labels_of(dataset) -> list[int]:
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return [int(v) for v in getattr(dataset, attr)]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow: loads every sample


class MutexPairDataset(Dataset):
    """Wraps a dataset of (x, y) into one of (x, y, x_mutex, y_mutex) with y_mutex != y.

    labels: the class of each sample; when omitted, taken from `dataset.targets` or
    `dataset.labels`, or by reading every sample once. With two classes, y_mutex = 1 − y.
    """

    def __init__(
        self, dataset, labels: Sequence[int] | None = None, num_classes: int = 2, seed: int = 0
    ):
        self.dataset = dataset
        labels = np.asarray(_labels_of(dataset) if labels is None else labels, dtype=np.int64)
        if labels.shape != (len(dataset),):
            raise ValueError(f"got {labels.shape[0]} labels for {len(dataset)} samples")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(f"labels must be in [0, {num_classes}); found {sorted(set(bad.tolist()))[:5]}")
        counts = np.bincount(labels, minlength=num_classes)
        empty = [c for c in range(num_classes) if counts[c] == 0]
        if empty:
            raise ValueError(
                f"class(es) {empty} have no samples (counts per class: {counts.tolist()}); "
                "mutex pairs need a sample of another class for every sample"
            )
        self.labels = labels
        self.seed = int(seed)
        self.epoch = 0
        # For each class, the indices of all samples of the other classes.
        self._others = [np.flatnonzero(labels != c) for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def partner(self, index: int) -> int:
        """The index of the mutex partner of `index` in the current epoch."""
        others = self._others[self.labels[index]]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return int(others[rng.integers(len(others))])

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        x_mutex, y_mutex = self.dataset[self.partner(index)]
        return x, torch.as_tensor(y), x_mutex, torch.as_tensor(y_mutex)
