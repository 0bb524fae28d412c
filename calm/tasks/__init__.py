"""Task families: data generators, loaders and scorers (one module each)."""
