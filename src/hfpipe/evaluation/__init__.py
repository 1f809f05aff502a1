"""Evaluating models: the evaluation tasks, their input files, log-likelihood scoring and `hfpipe eval`."""

from hfpipe.evaluation.evaluate import EvalArguments, evaluate_after_training

__all__ = ["EvalArguments", "evaluate_after_training"]
