"""Small shared helpers: lazy imports of optional dependencies, seeds derived from names."""
