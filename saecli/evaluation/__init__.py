"""Evaluation of trained dictionaries: reconstruction and latent metrics, density, CE/KL by splicing.

from saecli.evaluation import evaluate
result = evaluate(exp, "runs/tiny")          # writes eval.json, eval_density.png next to the SAE
"""

from saecli.evaluation.evaluate import evaluate

__all__ = ["evaluate"]
