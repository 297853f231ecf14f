"""The study file format and what is decided from it: the validated study and its arms (spec),
its runs and their keys (plan), the cost estimate of `harness plan` (cost), and how the
hypotheses are judged (hypotheses, stats) and when adaptive seeds stop (sequential).

The lowest layer: may import ddpm_engine only (docs/design.md, "Layers").
"""
