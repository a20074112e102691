"""Benchmark scripts that print figures (``python -m lens_ros.bench.<name>``); not tests."""
