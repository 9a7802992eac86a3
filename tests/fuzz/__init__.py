"""Hostile input, fuzzed: property tests over every reader of untrusted bytes (``python -m tests.fuzz.run``
runs the same properties for longer)."""
