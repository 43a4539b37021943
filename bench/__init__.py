"""Benchmarks that print figures (`greenroute bench`); targets are judged here, not in tests."""
