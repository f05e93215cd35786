"""Benchmarks runnable as `dflash-ray bench` and scripts under bench/."""
