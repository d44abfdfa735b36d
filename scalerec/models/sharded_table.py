"""A row-sharded item table: rank r of W holds its share of the C item rows and their optimizer state.

Why not ZeRO-3: ZeRO-3 gathers a whole parameter on every rank before its module runs, so a 10^8 x 64 table
(25.6 GB fp32) would be materialised on each rank. Here no rank ever holds more than its own rows plus the
rows a step touches:

* ``lookup(ids)`` fetches the rows a batch needs from their owners (``all_to_all_single``) and, in the
  backward, sends their gradients back to the owners;
* the sharded losses (``sharded_*`` beside each loss in ``scalerec/losses/``) score the queries against the
  local shard and combine the results with collectives;
* the table's own optimizer is row-sparse (row-wise Adagrad, lazy Adam, or SGD): a step touches only the rows
  that received a gradient. The table therefore stays outside DeepSpeed and its dense gradient all-reduce.

Row 0 is the padding item: it is stored nowhere, looks up as zeros and is never a candidate. Items are
1..C. The layout decides which rank owns an item: ``cyclic`` (item i on rank (i-1) mod W), ``block``
(contiguous ranges; the baseline that puts all popular items on rank 0 when ids follow popularity),
``snake`` (ids dealt round-robin, every other round backwards, so the rank that got the more popular item
of one round gets the less popular one of the next: balanced when ids are in popularity order, as in the
synthetic catalog) and ``popularity`` (items sorted by a popularity count, then dealt like ``snake``). Storage is
fp32 or bf16 (fp64 for exactness tests); computation is in fp32 (fp64 for an fp64 table), tile by tile.

With W = 1 (no process group) the table is the plain dense table and every loss accepts it.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any, Callable, Iterator

import torch

from scalerec.dist import collectives as coll
from scalerec.ops.row_update import adagrad_rows_

LAYOUTS = ("cyclic", "snake", "block", "popularity")
OPTIMIZERS = ("adagrad", "adam", "sgd")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp64": torch.float64, "float64": torch.float64}
_INIT_BLOCK = 1 << 18  # rows per init block; the init of row i depends only on (seed, i), never on W


class ShardLayout:
    """Which rank owns item i (1..C) and where it sits in that rank's shard."""

    def __init__(self, num_items: int, world_size: int, kind: str = "cyclic",
                 popularity: torch.Tensor | None = None):
        if kind not in LAYOUTS:
            raise ValueError(f"table.layout must be one of {LAYOUTS}, got {kind!r}")
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if world_size > num_items:
            raise ValueError(f"trainer.workers ({world_size}) is larger than the catalog (C = {num_items} items): "
                             "every worker must own at least one item row")
        self.num_items, self.world_size, self.kind = int(num_items), int(world_size), kind
        self.per_block = -(-self.num_items // self.world_size)
        self.order = self.position = None
        if kind == "popularity":
            if popularity is None or popularity.numel() not in (num_items, num_items + 1):
                raise ValueError("table.layout='popularity' needs a popularity count per item (C or C+1 values)")
            pop = popularity[-num_items:].to(torch.float64)
            # order[p] = item id at popularity position p (most popular first); ties keep id order
            self.order = torch.sort(-pop, stable=True).indices + 1
            self.position = torch.empty(num_items + 1, dtype=torch.long)
            self.position[self.order] = torch.arange(num_items)
            self.position[0] = -1

    def spec(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "world_size": self.world_size, "kind": self.kind, "order": self.order}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ShardLayout":
        lay = cls.__new__(cls)
        lay.num_items, lay.world_size, lay.kind = spec["num_items"], spec["world_size"], spec["kind"]
        lay.per_block = -(-lay.num_items // lay.world_size)
        lay.order = spec.get("order")
        lay.position = None
        if lay.order is not None:
            lay.position = torch.empty(lay.num_items + 1, dtype=torch.long)
            lay.position[lay.order] = torch.arange(lay.num_items)
            lay.position[0] = -1
        return lay

    def _pos(self, ids: torch.Tensor) -> torch.Tensor:
        return self.position[ids] if self.kind == "popularity" else ids - 1

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        p = self._pos(ids)
        if self.kind == "block":
            return p // self.per_block
        j = p % self.world_size
        if self.kind == "cyclic":
            return j
        odd = (p // self.world_size) % 2 == 1  # snake / popularity: every other round is dealt backwards
        return torch.where(odd, self.world_size - 1 - j, j)

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        p = self._pos(ids)
        return p % self.per_block if self.kind == "block" else p // self.world_size

    def shard_size(self, r: int) -> int:
        if self.kind == "block":
            return max(0, min(self.per_block, self.num_items - r * self.per_block))
        if self.kind == "cyclic":
            return (self.num_items - r + self.world_size - 1) // self.world_size
        full, rem = divmod(self.num_items, self.world_size)  # snake: the last partial round may run backwards
        return full + int((r < rem) if full % 2 == 0 else (r >= self.world_size - rem))

    def shard_ids(self, r: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Global ids of rank r's local rows ``start..end-1`` (in local order)."""
        n = self.shard_size(r)
        end = n if end is None else min(end, n)
        return self.ids_of(r, torch.arange(start, end, dtype=torch.long))

    def ids_of(self, r: int, loc: torch.Tensor) -> torch.Tensor:
        """Global ids of rank r's local rows ``loc`` (any shape)."""
        if self.kind == "block":
            return loc + r * self.per_block + 1
        if self.kind == "cyclic":
            return loc * self.world_size + r + 1
        W = self.world_size
        pos = loc * W + torch.where(loc % 2 == 1, W - 1 - r, r)
        return self.order[pos] if self.kind == "popularity" else pos + 1

    def load_imbalance(self, popularity: torch.Tensor) -> float:
        """max over ranks of the traffic a rank serves, over the mean (1.0 = perfectly balanced)."""
        pop = popularity[-self.num_items:].to(torch.float64)
        ids = torch.arange(1, self.num_items + 1)
        load = torch.zeros(self.world_size, dtype=torch.float64).index_add_(0, self.owner(ids), pop)
        return float(load.max() / load.mean())


def init_rows(ids: torch.Tensor, dim: int, std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) fp32 rows for global ids, the same for any world size or layout (blocks seeded by (seed, block))."""
    out = torch.empty(ids.numel(), dim)
    if ids.numel() == 0:
        return out
    blocks = torch.div(ids - 1, _INIT_BLOCK, rounding_mode="floor")
    g = torch.Generator()
    for b in torch.unique(blocks).tolist():
        sel = (blocks == b).nonzero().squeeze(1)
        g.manual_seed(seed * 1_000_003 + b)
        block = torch.randn(_INIT_BLOCK, dim, generator=g) * std
        out[sel] = block[ids[sel] - 1 - b * _INIT_BLOCK]
        del block
    return out


class _Lookup(torch.autograd.Function):
    """Rows of ``ids`` fetched from their owners; the backward sends the row gradients to the owners."""

    @staticmethod
    def forward(ctx, anchor, table: "ShardedItemTable", ids: torch.Tensor):
        out, saved = table._fetch(ids)
        ctx.table, ctx.saved = table, saved
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.table._push_grads(ctx.saved, grad)
        return None, None, None


class ShardedItemTable:
    """This rank's rows of a ``[C + 1, d]`` item table (row 0 = padding) and their row-sparse optimizer."""

    is_sharded_item_table = True

    def __init__(self, num_items: int, dim: int, *, group=None, layout: str = "cyclic",
                 popularity: torch.Tensor | None = None, dtype: str | torch.dtype = "fp32",
                 optimizer: str = "adagrad", lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, weight_decay: float = 0.0, init_std: float | None = None, seed: int = 0,
                 weight: torch.Tensor | None = None):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"table.optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"table.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        if dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"table.dtype must be fp32, bf16 or fp64, got {dtype}")
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.group = group
        self.rank, self.world_size = coll.rank(group), coll.world_size(group)
        self.num_items, self.dim, self.dtype = int(num_items), int(dim), dtype
        self.layout = ShardLayout(num_items, self.world_size, layout, popularity)
        self.optimizer, self.lr, self.betas, self.eps, self.weight_decay = optimizer, lr, tuple(betas), eps, weight_decay
        self.seed = seed
        self.n_local = self.layout.shard_size(self.rank)
        if weight is not None:  # a full dense [C + 1, d] table: take this rank's rows
            if tuple(weight.shape) != (num_items + 1, dim):
                raise ValueError(f"dense table must be [{num_items + 1}, {dim}], got {tuple(weight.shape)}")
            self.weight = weight.detach()[self.layout.shard_ids(self.rank)].to(dtype).contiguous()
        else:
            std = init_std if init_std is not None else math.sqrt(2.0 / (num_items + 1 + dim))  # xavier_normal_
            self.weight = torch.empty(self.n_local, dim, dtype=dtype)
            step = _INIT_BLOCK
            for s in range(0, self.n_local, step):
                self.weight[s : s + step] = init_rows(self.layout.shard_ids(self.rank, s, s + step), dim, std, seed)
        self.steps = 0
        self._alloc_state()
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._anchor = torch.zeros((), requires_grad=True)

    # ---------------------------------------------------------------- state
    def _alloc_state(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        if self.optimizer == "adagrad":
            self.state["sum"] = torch.zeros(self.n_local, dtype=self.compute_dtype)
        elif self.optimizer == "adam":
            self.state["exp_avg"] = torch.zeros(self.n_local, self.dim, dtype=self.compute_dtype)
            self.state["exp_avg_sq"] = torch.zeros(self.n_local, self.dim, dtype=self.compute_dtype)

    def nbytes(self) -> dict[str, int]:
        """Bytes this rank holds for its rows and their optimizer state."""
        state = sum(t.numel() * t.element_size() for t in self.state.values())
        return {"table": self.weight.numel() * self.weight.element_size(), "optimizer": state}

    def local_ids(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.layout.shard_ids(self.rank, start, end)

    def global_ids(self, local_idx: torch.Tensor) -> torch.Tensor:
        """Global item ids of this rank's local rows ``local_idx``."""
        return self.layout.ids_of(self.rank, local_idx)

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids > 0) & (self.layout.owner(ids.clamp(min=1)) == self.rank)

    def tiles(self, tile: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, end, rows_fp32)`` over this rank's rows in tiles of ``tile`` rows."""
        for s in range(0, self.n_local, tile):
            e = min(s + tile, self.n_local)
            yield s, e, self.weight[s:e].to(self.compute_dtype)

    # ---------------------------------------------------------------- rows across ranks
    def _fetch(self, ids: torch.Tensor):
        flat = ids.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        real = uniq > 0
        want = uniq[real]
        owners = self.layout.owner(want)
        order = torch.sort(owners, stable=True).indices
        req = want[order]
        counts = torch.bincount(owners, minlength=self.world_size).tolist()
        recv_ids, recv_counts = coll.exchange(req, counts, self.group)
        local = self.layout.local_index(recv_ids)
        rows, _ = coll.exchange(self.weight[local].to(self.compute_dtype), recv_counts, self.group,
                                recv_counts=counts)
        uniq_rows = torch.zeros(uniq.numel(), self.dim, dtype=self.compute_dtype)
        slot = real.nonzero().squeeze(1)[order]  # where each requested row goes among uniq
        uniq_rows[slot] = rows
        out = uniq_rows[inv].view(*ids.shape, self.dim)
        return out, (inv, slot, counts, recv_counts, local, uniq.numel())

    def send_grads(self, saved, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of rows fetched by ``_fetch`` sent to their owners (collective): returns this rank's
        ``(local indices, gradient rows)`` of what every rank sent it."""
        inv, slot, counts, recv_counts, local, n_uniq = saved
        g_uniq = torch.zeros(n_uniq, self.dim, dtype=self.compute_dtype).index_add_(
            0, inv, grad.reshape(-1, self.dim).to(self.compute_dtype))
        g_back, _ = coll.exchange(g_uniq[slot], counts, self.group, recv_counts=recv_counts)
        return local, g_back

    def _push_grads(self, saved, grad: torch.Tensor) -> None:
        self.accumulate_local(*self.send_grads(saved, grad))

    def fetch(self, ids: torch.Tensor):
        """Rows of ``ids`` (any ids per rank) from their owners, without autograd: ``(rows, handle)``; pass the
        handle and the rows' gradient to ``send_grads``. Collective."""
        return self._fetch(ids)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[*ids.shape, d]`` in the compute dtype (zeros for id 0), differentiable: gradients go to the
        owners' rows.

        Collective: every rank must call it (with its own ids) the same number of times, and run the backward.
        """
        return _Lookup.apply(self._anchor, self, ids)

    def gather_replicated(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` when every rank passes the same ids: owners fill theirs, one all-reduce."""
        buf = torch.zeros(ids.numel(), self.dim, dtype=self.compute_dtype)
        mine = self.owned(ids)
        buf[mine] = self.weight[self.layout.local_index(ids[mine])].to(self.compute_dtype)
        return coll.all_reduce(buf, "sum", self.group)

    def add_replicated_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Every rank holds the same ``grad`` rows for ``ids``; each owner keeps its own (no communication)."""
        mine = self.owned(ids)
        self.accumulate_local(self.layout.local_index(ids[mine]), grad[mine])

    def to_dense(self, dst: int | None = None) -> torch.Tensor | None:
        """The whole ``[C + 1, d]`` table (row 0 zeros, compute dtype) on every rank — small catalogs only."""
        full = torch.zeros(self.num_items + 1, self.dim, dtype=self.compute_dtype)
        full[self.local_ids()] = self.weight.to(self.compute_dtype)
        if self.world_size > 1:
            coll.all_reduce(full, "sum", self.group)
        return full

    # ---------------------------------------------------------------- gradients and the optimizer
    def accumulate_local(self, local_idx: torch.Tensor, grad: torch.Tensor) -> None:
        if local_idx.numel():
            self._grads.append((local_idx, grad.to(self.compute_dtype)))

    def zero_grad(self) -> None:
        self._grads = []

    def local_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Coalesced ``(local_indices, grad_rows)`` accumulated since the last step."""
        if not self._grads:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, self.dim, dtype=self.compute_dtype)
        idx = torch.cat([i for i, _ in self._grads])
        rows = torch.cat([g for _, g in self._grads])
        uniq, inv = torch.unique(idx, return_inverse=True)
        return uniq, torch.zeros(uniq.numel(), self.dim, dtype=self.compute_dtype).index_add_(0, inv, rows)

    def dense_grad(self) -> torch.Tensor:
        """This rank's accumulated gradient as a dense ``[C + 1, d]`` tensor of global rows (tests only)."""
        idx, rows = self.local_grad()
        full = torch.zeros(self.num_items + 1, self.dim, dtype=self.compute_dtype)
        full[self.local_ids()[idx] if idx.numel() else idx] = rows
        return full

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0, lr: float | None = None) -> int:
        """Apply the row-sparse optimizer to the rows touched since the last step; returns how many."""
        lr = self.lr if lr is None else lr
        idx, g = self.local_grad()
        self._grads = []
        self.steps += 1
        if idx.numel() == 0:
            return 0
        if grad_scale != 1.0:
            g.mul_(grad_scale)
        w = self.weight[idx].to(self.compute_dtype)
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        if self.optimizer == "sgd":
            w.add_(g, alpha=-lr)
        elif self.optimizer == "adagrad":  # row-wise: one accumulator per row (mean of g^2 over the row)
            s = self.state["sum"][idx]
            adagrad_rows_(w, g, s, lr, self.eps)
            self.state["sum"][idx] = s
        else:  # lazy Adam: moments of untouched rows are not decayed (torch.optim.SparseAdam semantics)
            b1, b2 = self.betas
            m = self.state["exp_avg"][idx].mul_(b1).add_(g, alpha=1 - b1)
            v = self.state["exp_avg_sq"][idx].mul_(b2).addcmul_(g, g, value=1 - b2)
            self.state["exp_avg"][idx], self.state["exp_avg_sq"][idx] = m, v
            bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
            w.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(self.eps), value=-lr)
        self.weight[idx] = w.to(self.dtype)
        return int(idx.numel())

    # ---------------------------------------------------------------- losses without a sharded form
    def dense_leaf(self) -> torch.Tensor:
        """W = 1 only: the table as a dense fp32 leaf whose gradient flows into the row-sparse optimizer."""
        assert self.world_size == 1
        leaf = self.to_dense().requires_grad_(True)

        def hook(g):
            rows = (g[1:] != 0).any(1).nonzero().squeeze(1)
            self.accumulate_local(self.layout.local_index(rows + 1), g[rows + 1])
            return g

        leaf.register_hook(hook)
        return leaf

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"meta": {"num_items": self.num_items, "dim": self.dim, "rank": self.rank,
                         "world_size": self.world_size, "dtype": str(self.dtype), "optimizer": self.optimizer,
                         "steps": self.steps, "seed": self.seed},
                "layout": self.layout.spec(), "weight": self.weight, "state": self.state}

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"table-rank{self.rank:05d}-of-{self.world_size:05d}.pt")
        torch.save(self.state_dict(), path)
        return path

    def load(self, directory: str) -> None:
        """Load this rank's rows from the shards of a checkpoint written at any world size and layout."""
        paths = sorted(glob.glob(os.path.join(directory, "table-rank*-of-*.pt")))
        if not paths:
            raise FileNotFoundError(f"no table shards (table-rank*-of-*.pt) in {directory}")
        seen = 0
        for p in paths:
            sd = torch.load(p, weights_only=False)
            meta = sd["meta"]
            if (meta["num_items"], meta["dim"]) != (self.num_items, self.dim):
                raise ValueError(f"{p}: table is {meta['num_items']} x {meta['dim']}, "
                                 f"this run wants {self.num_items} x {self.dim}")
            if meta["optimizer"] != self.optimizer:
                raise ValueError(f"{p}: table.optimizer was {meta['optimizer']!r}, this run uses {self.optimizer!r}")
            old = ShardLayout.from_spec(sd["layout"])
            ids = old.shard_ids(meta["rank"])
            mine = self.owned(ids)
            loc = self.layout.local_index(ids[mine])
            self.weight[loc] = sd["weight"][mine].to(self.dtype)
            for k, v in sd["state"].items():
                self.state[k][loc] = v[mine]
            self.steps = meta["steps"]
            seen += int(mine.sum())
            del sd
        if seen != self.n_local:
            raise ValueError(f"checkpoint {directory} gave {seen} of this rank's {self.n_local} rows (missing shards?)")
