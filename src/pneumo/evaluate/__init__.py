"""Judging a model: metrics with patient-level intervals, evaluation of a split, report.md and plots,
Grad-CAM."""
