"""Measured efficiency: latency of physically shrunk models, side by side."""

from raysparse.efficiency.latency import LatencyResult, environment, measure_latency, median_speedups
from raysparse.efficiency.memory import ResidentMemory, disk_bytes, resident_memory
from raysparse.efficiency.report import BenchReport, BenchRow, bench, read_csv

__all__ = ["BenchReport", "BenchRow", "LatencyResult", "ResidentMemory", "bench", "disk_bytes", "environment",
           "measure_latency", "median_speedups", "read_csv", "resident_memory"]
