"""Full-ranking evaluation over the whole catalog."""
from scalerec.eval.metrics import evaluate, metrics_from_ranks, rank_and_topk

__all__ = ["evaluate", "metrics_from_ranks", "rank_and_topk"]
