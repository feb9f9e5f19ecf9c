"""Model adapters: the only code that touches `transformers` internals (one module per family)."""
