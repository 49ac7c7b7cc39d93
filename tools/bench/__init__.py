"""Benchmarks: throughput, model FLOPs utilisation and memory, written to ``results/``.

Run one with ``python -m tools.bench NAME [options]``; each ``tools.bench.NAME``
module has a ``main(argv)``. Results are JSON files that carry the hardware, the date
and the torch version they were measured with, so the book can cite them.
"""
