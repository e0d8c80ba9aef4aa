"""Trained anomaly-detection baselines through anomalib, judged by filo's metrics.

``python -m filo.baselines fit --model NAME`` trains one anomalib model per class on any
dataset layout filo reads (:mod:`filo.baselines.fit`); ``test.py --baseline DIR`` scores the
test split with them through filo's runner (:mod:`filo.baselines.scorer`): same columns,
cache and gallery as the zero-shot rows (docs/design.md §17). anomalib is optional
(``pip install 'filo[anomalib]'``) and imported in :mod:`filo.baselines.backend` only.
"""
