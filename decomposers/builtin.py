"""Imports every built-in decomposer module so that they register themselves."""
