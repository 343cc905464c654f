"""Validated, plain-data descriptions of models, hardware and whole systems."""
