"""Composer-style multi-condition, composable image diffusion."""

from composer.conditions import Conditions, ConditionSpec

__all__ = ["Conditions", "ConditionSpec"]
