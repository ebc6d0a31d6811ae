"""The streaming core: no Flask, no HTTP status codes. Service entry points,
the generation, the registry and admission, the cancel bus, followers, the
event log, slots, sessions, every Redis key, the worker's upkeep.
"""
