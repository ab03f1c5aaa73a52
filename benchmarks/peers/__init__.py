"""Peer comparisons: the same workloads through atom_trio and another engine in its own venv."""
