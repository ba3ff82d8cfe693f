"""Evaluation of attributions: generated LDS worlds (`world`), the LDS metric with CIs (`lds`), and
attribution variants scored against the exact-gradient reference (`study`)."""
