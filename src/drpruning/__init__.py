"""drpruning: distributionally robust structured pruning and continued pretraining of causal LMs."""

__version__ = "0.1.0"
