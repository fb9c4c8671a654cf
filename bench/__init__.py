"""lossd benchmark suite: transport floor, compute floor and lossd end to end (issue 5).

Run ``python -m bench.run`` (see bench/README.md).
"""
