"""MuSc: training-free zero-shot segmentation by mutual scoring of unlabeled images.

Li et al., "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual
Scoring of the Unlabeled Images", ICLR 2024. docs/design.md section 16 is filo's account of
what is computed; the modules each do one step:

* :mod:`filo.musc.tower`: the CLIP vision tower (OpenAI file, open_clip state dict or the CLIP
  of a FiLo checkpoint) and its taps plus the image feature;
* :mod:`filo.musc.lnamd`: local neighbourhood aggregation (LNAMD);
* :mod:`filo.musc.msm`: mutual scoring (MSM), in blocks of batched matrix products;
* :mod:`filo.musc.rscin`: image-score re-scoring (RsCIN);
* :mod:`filo.musc.scorer`: the set scorer and the pool scorer the pipeline plugs in;
* :mod:`filo.musc.pool`: reference pools on disk (``python -m filo.musc pool``).
"""

from filo.musc.config import MuscSettings

__all__ = ["MuscSettings"]
