"""Benchmarks: speed and memory (``speed``) and kernel-approximation quality (``approximation``).

Run ``python -m lra_benchmarks.benchmarks.speed --help`` or
``python -m lra_benchmarks.benchmarks.approximation --help``.
"""
