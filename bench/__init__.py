"""Benchmarks of the service on this machine: ``make bench`` (see ``BENCHMARKS.md``).

Nothing here is imported by the service; ``bench.metering`` drives real processes over HTTP.
"""
