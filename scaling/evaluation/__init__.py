"""Evaluation: batched generation (free, candidate-constrained, all-candidate scoring), metrics and reports."""
