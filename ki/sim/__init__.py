"""Simulated benchmarks that ki's policies are judged on in closed loop (Meta-World)."""
