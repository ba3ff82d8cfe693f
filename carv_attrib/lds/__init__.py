"""LDS: generated worlds, subset retraining, the metric with CIs, and variants against the exact reference."""
