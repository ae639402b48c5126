"""Measuring whether an explainer is faithful: perturbation metrics, a sanity check, a ground-truth task."""
