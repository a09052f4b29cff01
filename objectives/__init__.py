"""Objectives: one module per method, the objective registry, their configs, shared model pieces
(`objectives.components`) and the artifact store (`objectives.artifacts`).

Kept import-light (no torch) so that config validation stays fast: import
`objectives.registry` or `objectives.base` for the classes. Imports only from `data/`.
"""
