"""Experiments: the reproduction study and its report."""
