"""Experiments built from the library only, one package each (kv: key-value arithmetic)."""
