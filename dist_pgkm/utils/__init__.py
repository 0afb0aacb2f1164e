"""Small shared helpers (today: lazy imports of optional dependencies)."""
