"""Data for MA-Net: mutex pairing (a sample and a random sample of another class)."""
from mutex_attn.data.pairing import MutexPairDataset

__all__ = ["MutexPairDataset"]
