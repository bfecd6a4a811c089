"""hpsearch: search how to compress a causal LLM.

Hydra composes compression stages, an Optuna multi-objective study searches per-layer choices
(bit-widths, group sizes, sparsity, LoRA ranks, KV precision), W&B logs every trial, and a report
shows the Pareto front. Importing this package is cheap: heavy modules load on first use.
"""

__version__ = "0.1.0"
