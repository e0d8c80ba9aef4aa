"""filo: zero-shot anomaly segmentation (FiLo + GroundingDINO), offline."""
__version__ = "0.1.0"
