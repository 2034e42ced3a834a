"""Mutex pairing: a random sample of the other class for every sample, reproducibly."""
import pytest
import torch
from torch.utils.data import TensorDataset

from mutex_attn.data import MutexPairDataset


class Labelled(TensorDataset):
    def __init__(self, labels):
        labels = torch.tensor(labels)
        super().__init__(torch.arange(len(labels)).float(), labels)
        self.targets = labels.tolist()


def test_partner_is_always_the_other_class():
    labels = [0, 1] * 10 + [1] * 5
    pairs = MutexPairDataset(Labelled(labels), seed=3)
    for epoch in range(3):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            x, y, xm, ym = pairs[i]
            assert ym.item() == 1 - y.item()
            assert labels[int(xm)] == ym.item()  # the partner's image is really of that class


def test_reproducible_and_changes_per_epoch():
    labels = [0] * 20 + [1] * 20
    a, b = MutexPairDataset(Labelled(labels), seed=7), MutexPairDataset(Labelled(labels), seed=7)
    first = [a.partner(i) for i in range(40)]
    assert first == [b.partner(i) for i in range(40)]
    a.set_epoch(1)
    assert first != [a.partner(i) for i in range(40)]
    c = MutexPairDataset(Labelled(labels), seed=8)
    assert first != [c.partner(i) for i in range(40)]


def test_tiny_minority_class():
    labels = [0] * 99 + [1]
    pairs = MutexPairDataset(Labelled(labels))
    assert all(pairs.partner(i) == 99 for i in range(99))
    assert labels[pairs.partner(99)] == 0


def test_labels_without_attribute_are_read_from_samples():
    ds = TensorDataset(torch.zeros(4), torch.tensor([0, 1, 1, 0]))
    pairs = MutexPairDataset(ds)
    assert all(pairs[i][3].item() == 1 - pairs[i][1].item() for i in range(4))


def test_empty_class_is_an_error():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no samples"):
        MutexPairDataset(Labelled([0, 0, 0]))


def test_out_of_range_label_is_an_error():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        MutexPairDataset(Labelled([0, 1, 2]))
