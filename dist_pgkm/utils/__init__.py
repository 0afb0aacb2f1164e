"""Small shared helpers: optional imports, seeding, timing."""
