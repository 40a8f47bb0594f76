"""Simulated parts for tests, benchmarks and the demo: what cannot run on a machine without a
GPU (vLLM, trtllm-serve, hosted APIs), reproduced down to their bytes."""
