"""torchrec-hstu: HSTU (generative recommenders) for torchrec."""

__version__ = "0.1.0"
