"""Development tools, not runtime code: the OpenAI-compatible simulator and the
harness that starts real processes for the tests and the benchmarks.
"""
