"""Experiments: configs, data, models, the side-by-side trainer and its report."""
