"""Benchmarks: `python -m benchmarks NAME [--quick]`, or `all`.

Each benchmark module exposes `run(quick: bool) -> Figures`, prints its own readable table to
stdout and returns its named figures; the runner prints them as one JSON object on the last line.
"""
