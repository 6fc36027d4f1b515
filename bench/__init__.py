"""Orchestration benchmarks (issue 6): `python -m bench` / `make bench`; see docs/benchmarks.md."""
