"""Decomposers: one module per representation (registered in decomposers.builtin), a registry, the plugin
entry point, and DecomposerSet (decomposers.set), the pipeline component that runs them."""
