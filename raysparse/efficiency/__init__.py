"""Measured efficiency: latency of physically shrunk models, side by side."""

from raysparse.efficiency.latency import (LatencyResult, environment, fixed_threads, measure_latency, median_speedups,
                                          ratio_interval, time_calls, time_rounds)
from raysparse.efficiency.latency_table import LatencyTable, check_predictions
from raysparse.efficiency.memory import ResidentMemory, disk_bytes, resident_memory
from raysparse.efficiency.report import BenchReport, BenchRow, bench, read_csv

__all__ = ["BenchReport", "BenchRow", "LatencyResult", "LatencyTable", "ResidentMemory", "bench", "check_predictions",
           "disk_bytes", "environment", "fixed_threads", "measure_latency", "median_speedups", "ratio_interval",
           "read_csv", "resident_memory", "time_calls", "time_rounds"]
