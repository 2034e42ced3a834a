"""Image transforms for training and evaluation, and augmentation that is a pure function of
(seed, epoch, index): a run resumes exactly and gives the same batches with any number of
DataLoader workers."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

# ImageNet statistics: the backbones are ImageNet models (pretrained or not).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def eval_transform(img_size: int):
    """PIL RGB → normalised [3, img_size, img_size] float tensor."""
    return T.Compose([
        T.Resize((img_size, img_size), antialias=True),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def train_transform(img_size: int, rotation: float = 15.0, augment: bool = True):
    """The paper's augmentation: horizontal and vertical flips and a random rotation."""
    if not augment:
        return eval_transform(img_size)
    return T.Compose([
        T.Resize((img_size, img_size), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.RandomRotation(rotation),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from the three, the same on every platform and Python."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class SeededTransform(Dataset):
    """dataset[i] = (transform(image_i), label_i), with the transform's random draws seeded by
    (seed, epoch, i). Call `set_epoch` each epoch. Passes `targets`/`patients` through."""

    def __init__(self, dataset, transform, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    @property
    def targets(self):
        return self.dataset.targets

    @property
    def patients(self):
        return getattr(self.dataset, "patients", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        # torchvision draws from the global generator: fork it so the caller's is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed(self.seed, self.epoch, index))
            return self.transform(image), label
