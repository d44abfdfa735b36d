"""``scalerec train``, ``scalerec evaluate`` and ``scalerec plan``."""
from __future__ import annotations

import json
import sys


def _print_metrics(title: str, metrics: dict, ks=(10, 20)) -> None:
    parts = [f"{name}@{k} {metrics[f'{name}@{k}']:.4f}" for k in ks for name in ("NDCG", "HR") if f"{name}@{k}" in metrics]
    print(f"{title}: " + "  ".join(parts))


def cmd_train(args) -> int:
    from scalerec.train.config import load_config
    from scalerec.train.run import train

    cfg = load_config(args.config, args.overrides)
    resume = args.resume or (cfg.trainer.resume or None)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    result = train(cfg, resume=resume, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        _print_metrics(f"test ({result['test']['cases']} users, best epoch {result['best_epoch']})", result["test"])
        print(f"checkpoint: {result['output_dir']}/best")
    return 0


def cmd_evaluate(args) -> int:
    from scalerec.data.source import DataSource
    from scalerec.eval import evaluate
    from scalerec.train.checkpoint import check_same_data, load_checkpoint

    model, cfg, info = load_checkpoint(args.checkpoint)
    if args.data:
        cfg.data.path = args.data
    source = DataSource(cfg)
    check_same_data(info["state"], source.meta(), args.checkpoint)
    dataset = source.dataset if source.dataset is not None else source.synthetic
    ks = [int(k) for k in cfg.eval.ks]
    metrics = evaluate(model, dataset, args.split, ks, int(cfg.eval.batch_size), progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        for k in ks:
            print(f"@{k:<3} HR {metrics[f'HR@{k}']:.4f}  NDCG {metrics[f'NDCG@{k}']:.4f}  "
                  f"MRR {metrics[f'MRR@{k}']:.4f}  COV {metrics[f'COV@{k}']:.4f}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train SASRec from a YAML config (key=value overrides)")
    p.add_argument("config", help="YAML config, e.g. launch/configs/beauty_demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.name=sce trainer.epochs=5")
    p.add_argument("--resume", default=None, help="checkpoint directory to continue from (OUTPUT_DIR/checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results last")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-ranking metrics of a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/beauty_demo/best")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--data", default=None, help="override the data path stored in the checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    try:
        from scalerec.train.plan import add_plan_parser
    except ModuleNotFoundError:
        return
    add_plan_parser(sub)
