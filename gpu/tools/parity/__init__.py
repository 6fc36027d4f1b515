"""Parity checks against the reference implementation (run by hand; see docs/parity.md)."""
