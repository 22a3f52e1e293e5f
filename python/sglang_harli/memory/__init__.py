"""Memory that fine-tuning borrows: the arena over lent regions (no SGLang here)."""
