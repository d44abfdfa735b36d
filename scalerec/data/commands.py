"""``scalerec info DATA``: users, items, interactions, sequence-length statistics."""
from __future__ import annotations

import json


def cmd_info(args) -> int:
    if args.path.startswith("synthetic:"):
        from scalerec.data.synthetic import describe_spec  # scale-out: generated catalogs

        info = describe_spec(args.path)
    else:
        from scalerec.data import load_dataset

        ds = load_dataset(args.path, None if args.format == "auto" else args.format, split=args.split,
                          min_item_count=args.min_item_count, min_user_count=args.min_user_count)
        info = ds.describe()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe an interaction dataset")
    p.add_argument("path", help="data file (user_seq / user_item / u.data / csv / parquet)")
    p.add_argument("--format", default="auto")
    p.add_argument("--split", default="loo", choices=["loo", "temporal"])
    p.add_argument("--min-item-count", type=int, default=0)
    p.add_argument("--min-user-count", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
