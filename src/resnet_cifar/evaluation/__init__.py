"""Evaluation reports: metrics beyond accuracy, figures, and ``report.md``."""
