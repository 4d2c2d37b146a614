"""Benchmarks and diagnostics behind the launch/ entry points."""
