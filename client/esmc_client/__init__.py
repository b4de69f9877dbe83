"""Python client for esmc-serve (no torch needed)."""
