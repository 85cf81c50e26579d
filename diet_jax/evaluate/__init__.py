"""Evaluation: the candidate protocol, baselines under it, fidelity, report and plots."""
