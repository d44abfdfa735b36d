"""Full-ranking evaluation over the whole catalog (dense or row-sharded table)."""
from scalerec.eval.full_ranking import evaluate, evaluate_table, rank_and_topk
from scalerec.eval.metrics import metrics_from_ranks

__all__ = ["evaluate", "evaluate_table", "metrics_from_ranks", "rank_and_topk"]
