"""Objectives of a compression study: each returns one named value with a direction.

Installed as ``hpsearch.objectives``. Accuracy (:mod:`.perplexity`), memory (:mod:`.memory`) and
latency (:mod:`.latency`) live in one module each; :mod:`.base` holds the interface.
"""
