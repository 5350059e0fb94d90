"""Experiments: config loading and overrides, run directories, sweeps, run index and reports."""
