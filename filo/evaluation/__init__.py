"""Evaluation: per-image prediction cache, per-class metrics and result tables, the test run."""
