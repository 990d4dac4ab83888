"""Benchmarks: print tables of medians and ratios against a baseline measured in the same run."""
