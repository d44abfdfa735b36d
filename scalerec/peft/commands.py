"""``scalerec finetune``: fine-tune a transformer's MLP blocks with SparseGrad, MeProp, LoRA or full fine-tuning.

    scalerec finetune --method sparsegrad --model minilm --task sst2 steps=300 density=0.01 --json
    scalerec finetune --method lora --model smollm2 --task shakespeare steps=30 batch_size=4

Shows a progress bar, appends one JSON line per step (and the final figures) to ``--metrics`` (JSONL), and with
``--json`` prints the final figures as one JSON object on the last line. Settings (``key=value``): see
:class:`scalerec.peft.train.FinetuneSettings`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import fields


def add_parser(subparsers) -> None:
    from scalerec.peft.train import METHODS, TASKS, FinetuneSettings

    keys = ", ".join(f.name for f in fields(FinetuneSettings) if f.name not in ("method", "model", "task"))
    p = subparsers.add_parser("finetune", help="fine-tune MLP blocks: SparseGrad, MeProp, LoRA or full",
                              description=__doc__.splitlines()[0] + f" Settings: {keys}.")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--model", default="minilm",
                   help="model folder, .gguf file, or 'minilm' / 'smollm2' for the bundled packages")
    p.add_argument("--task", choices=TASKS, default="sst2")
    p.add_argument("--metrics", default=None, help="JSONL metrics file (default runs/finetune/<method>-<task>-<time>.jsonl)")
    p.add_argument("--save", default=None, help="save the fine-tuned model here (SparseGrad layers reverted first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final figures as one JSON object last")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args) -> int:
    from scalerec.extras import require

    require("peft", "transformers", command="finetune")  # every method loads its model with transformers
    if args.method == "lora":
        require("peft", "peft", command="finetune")
    from scalerec.peft.train import FinetuneSettings, jsonl_logger, run_finetune

    s = FinetuneSettings.from_overrides({"method": args.method, "model": args.model, "task": args.task},
                                        args.overrides)
    metrics = args.metrics or os.path.join("runs", "finetune",
                                           f"{s.method}-{s.task}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    log = jsonl_logger(metrics)
    res = run_finetune(s, log=log, progress=not args.no_progress, keep_model=bool(args.save))
    model = res.pop("_model", None)
    if args.save and model is not None:
        from scalerec.peft.sparsegrad import revert_sparsegrad

        if hasattr(model, "merge_and_unload"):  # peft LoRA
            model = model.merge_and_unload()
        revert_sparsegrad(model)
        model.save_pretrained(args.save)
        res["saved"] = args.save
    res["metrics"] = metrics
    if args.json:
        print(json.dumps(res, default=str))
    else:
        keys = ("method", "task", "steps", "steps_per_s", "dev_accuracy", "heldout_loss_before", "heldout_loss_after",
                "peak_rss_mb", "trainable")
        for k in keys:
            if k in res:
                print(f"{k}: {res[k]}")
        print(f"metrics: {metrics}")
    return 0
