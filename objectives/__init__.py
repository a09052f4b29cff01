"""Objectives: one module per method family, a registry, and shared pieces."""

from objectives.base import DataNeeds, LossOutput, Objective
from objectives.registry import available, get_objective_class, register

__all__ = ["DataNeeds", "LossOutput", "Objective", "available", "get_objective_class", "register"]
