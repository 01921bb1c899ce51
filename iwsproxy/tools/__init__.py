"""Tooling around the proxy, not part of it: the benchmark and its load generator, the demo, the
echo backend they and the tests use, and the child processes that run them.

The proxy never imports this package; ``iwsproxy demo`` and ``iwsproxy bench`` do.
"""
