"""Tools that measure attention variants: timing, memory, demos (used by the CLI)."""
