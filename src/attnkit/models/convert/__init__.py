"""Conversions between attention variants on a loaded model (fewer KV heads, MHA, MLA)."""
