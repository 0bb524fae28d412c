"""Experiments built from the library only, one package each (kv: key-value arithmetic), and what
they share: `runner` (rows run once and resumed across invocations) and `bootstrap` (paired
intervals between rows)."""
