"""Evaluation: perplexity under the protocol of MISSION.md."""

from jaxquant.eval.perplexity import PerplexityResult, evaluate_perplexity, window_nll

__all__ = ["PerplexityResult", "evaluate_perplexity", "window_nll"]
