"""Per-iteration co-run decisions and their bookkeeping (imports nothing from SGLang)."""
