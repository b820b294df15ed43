"""Evaluation: per-domain perplexity and bits per byte (`perplexity`, on the training loss `drpruning.loss`),
native multiple-choice tasks (`tasks`), the lm-eval bridge, and `drpruning eval` itself (`run`)."""

from drpruning.evaluation.perplexity import domain_losses, domain_nll, loss_and_error, summarize
from drpruning.evaluation.run import evaluate, evaluate_model, format_table, resolve_model_dir

__all__ = ["domain_losses", "domain_nll", "loss_and_error", "summarize", "evaluate", "evaluate_model", "format_table",
           "resolve_model_dir"]
