"""medrl's benchmarks (not tests): ``python -m bench.run_all`` runs them all.

Each ``bench_*.py`` module measures medrl side by side with a peer or a raw limit in one
process, prints a table, and writes ``bench/results/<name>.json``; ``bench.report`` turns
those files into the tables of ``BENCHMARKS.md``.
"""
