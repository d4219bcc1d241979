"""ml_collections configs for the LRA trainer: one base per task, one small file per combination.

Run one with ``python -m lra_benchmarks.train --config=configs/listops_posrf_qmc.py``.
"""
