"""The gateway benchmark: ``python bench/run.py [--duration S] [--quick] [--runs N]`` (see run.py)."""
