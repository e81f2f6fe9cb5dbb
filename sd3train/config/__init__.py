"""Typed config: schemas (the one source of defaults), composition from conf/, validation."""
