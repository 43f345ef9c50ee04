"""Measured efficiency: latency of physically shrunk models, side by side."""

from raysparse.efficiency.latency import LatencyResult, environment, measure_latency, median_speedups

__all__ = ["LatencyResult", "environment", "measure_latency", "median_speedups"]
