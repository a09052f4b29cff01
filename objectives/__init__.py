"""Objectives: one module per method family, a registry, and shared pieces.

Kept import-light (no torch) so that config validation stays fast: import
`objectives.registry` or `objectives.base` for the classes.
"""
