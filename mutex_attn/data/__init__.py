"""Data for MA-Net: mutex pairing, seeded augmentation, dataset loaders, synthetic CT."""
from mutex_attn.data.pairing import MutexPairDataset
from mutex_attn.data.transforms import SeededTransform, eval_transform, train_transform

__all__ = ["MutexPairDataset", "SeededTransform", "eval_transform", "train_transform"]
