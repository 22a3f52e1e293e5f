"""``python -m sglang_harli.bench``: the evidence (trace replay against every mode, fleet
simulation). See docs/benchmarks.md."""
