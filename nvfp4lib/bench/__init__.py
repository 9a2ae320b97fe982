"""Benchmarks: ``python -m nvfp4lib.bench <name> [args]`` runs ``nvfp4lib.bench.<name>.main(args)``.

:mod:`nvfp4lib.bench.harness` holds the method every benchmark shares: CUDA-graph replay over rotating
weight sets, medians, the measured copy bandwidth and HBM floors, and the metadata of a recorded result.
"""
