"""Benchmarks and scripted load tests for atom_trio, runnable from the repository root.

* ``python -m benchmarks.benchmark_serving``: load an OpenAI-compatible server (this one or any
  other) and report throughput and TTFT / TPOT / ITL / E2EL, with vLLM's flags and definitions.
* ``python -m benchmarks.benchmark_throughput``: offline throughput through the library.
* ``benchmarks/peers/``: set up vLLM's CPU build and run the same workloads through both engines.
"""
