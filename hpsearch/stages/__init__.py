"""Compression stages: one class per file, applied in the configured ``pipeline`` order."""
