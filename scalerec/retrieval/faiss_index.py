"""``FaissIndex``: any FAISS index factory string, inner-product metric, CPU or GPU.

* ``factory``: ``"Flat"`` (exact), ``"IVF{nlist},Flat"``, ``"IVF{nlist},PQ{m}"``, ``"HNSW32"``, or any other
  factory string FAISS accepts with ``METRIC_INNER_PRODUCT``. Indexes that need training (IVF, PQ) are
  trained on a random sample of ``train_size`` rows (default: ``max(64 * nlist, 10240)``, at most C).
* search parameters: ``nprobe`` (IVF) and ``efSearch`` (HNSW), set at construction or with ``set_params``.
* GPU: used when FAISS was built with GPU support (``faiss.get_num_gpus() > 0``) and either
  ``device="cuda"`` is given or the table lives on CUDA (``device=None``). The CPU index is converted with
  ``index_cpu_to_gpu`` before training, so k-means and the adds run on the GPU too. Index types FAISS has
  no GPU version of (HNSW) stay on the CPU with a warning. Without GPU FAISS (``faiss-cpu``, as here) the
  CPU index is used and CUDA tensors are copied to the host for each call.
* Tensors: ``faiss.contrib.torch_utils`` is imported, so torch tensors are passed to FAISS by pointer --
  float32 contiguous CPU tensors (CUDA tensors for a GPU index) cross without a copy; results come back
  as torch tensors.
* ids: FAISS stores rows 1..C as its ids 0..C-1; results are shifted back to item ids 1..C.
* ``refresh(table)``: re-encodes all rows with the trained structures kept (IVF centroids and PQ
  codebooks are not retrained; pass ``retrain=True`` for that). HNSW has no removal, so its refresh is a
  full rebuild.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets FAISS take torch tensors by pointer)
import torch

from scalerec.retrieval.base import MipsIndex, finalize_topk, normalize_exclude


def faiss_has_gpu() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover
        return False


class FaissIndex(MipsIndex):
    """MIPS with a FAISS index built from a factory string (inner-product metric).

    Args:
        factory: FAISS index factory string, e.g. ``"Flat"``, ``"IVF1024,Flat"``, ``"IVF1024,PQ16"``, ``"HNSW32"``.
        nprobe: IVF lists visited per query (IVF indexes only).
        efSearch: HNSW search breadth (HNSW indexes only).
        efConstruction: HNSW build breadth (HNSW indexes only).
        train_size: rows sampled to train IVF/PQ (None: ``max(64 * nlist, 10240)``, at most C).
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"`` or None (follow the table's device when GPU FAISS exists).
        seed: seed of the training sample and of FAISS k-means.
        query_batch: queries per FAISS call (bounds the over-fetch buffers when excluding ids).
    """

    def __init__(
        self,
        factory: str = "Flat",
        item_table: torch.Tensor | None = None,
        *,
        nprobe: int | None = None,
        efSearch: int | None = None,
        efConstruction: int | None = None,
        train_size: int | None = None,
        device: str | None = None,
        seed: int = 0,
        query_batch: int = 16384,
    ):
        if not isinstance(factory, str) or not factory.strip():
            raise ValueError(f"FaissIndex: factory must be a non-empty FAISS factory string, got {factory!r}")
        self.factory = factory.strip()
        self.nprobe = nprobe
        self.efSearch = efSearch
        self.efConstruction = efConstruction
        self.train_size = train_size
        self.device = device
        self.seed = int(seed)
        self.query_batch = int(query_batch)
        self.index: Any = None
        self._nlist = 0
        self._is_hnsw = False
        self.on_gpu = False
        self._gpu_res = None
        self._gpu_device = 0
        # a string FAISS cannot parse fails here, before any data is touched; errors that depend on d
        # (e.g. PQ m not dividing d) are raised by build()
        try:
            self._make_cpu_index(_pq_friendly_dim(self.factory), check_only=True)
        except ValueError as exc:
            if "could not parse" in str(exc):
                raise
        if item_table is not None:
            self.build(item_table)

    # ------------------------------------------------------------------ construction
    def _make_cpu_index(self, d: int, check_only: bool = False):
        where = "" if check_only else f" for d={d}"
        try:
            index = faiss.index_factory(d, self.factory, faiss.METRIC_INNER_PRODUCT)
        except Exception as exc:  # FAISS raises RuntimeError with its C++ message
            detail = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            raise ValueError(
                f"FaissIndex: invalid FAISS factory string {self.factory!r}{where} with the inner-product metric "
                f"(examples: 'Flat', 'IVF1024,Flat', 'IVF1024,PQ16', 'HNSW32'): {detail}"
            ) from None
        return index

    def _want_gpu(self, table: torch.Tensor) -> bool:
        if self.device is not None:
            wants = str(self.device).startswith("cuda")
        else:
            wants = table.is_cuda
        if wants and not faiss_has_gpu():
            if self.device is not None:
                warnings.warn("FaissIndex: device='cuda' asked for but FAISS has no GPU support here; using the CPU index")
            return False
        return wants

    def build(self, item_table: torch.Tensor) -> "FaissIndex":
        table = self._check_table(item_table)
        C, d = table.size(0) - 1, table.size(1)
        index = self._make_cpu_index(d)
        # the structure is read from the CPU index (a GPU IVF index is no faiss.IndexIVF)
        ivf = _ivf_of(index)
        self._nlist = int(ivf.nlist) if ivf is not None else 0
        self._is_hnsw = _hnsw_of(index) is not None
        # FAISS's factory turns on polysemous training for PQ (a code permutation for Hamming filtering,
        # unused unless polysemous_ht is set): it costs ~10x the PQ training itself, so it is off here
        for sub in (index, ivf):
            if sub is not None and hasattr(sub, "do_polysemous_training"):
                sub.do_polysemous_training = False
        if ivf is not None:
            ivf.cp.seed = self.seed
        self.on_gpu = False
        if self._want_gpu(table):
            index = self._to_gpu(index, table)
        self.index = index
        self.num_items, self.dim = C, d
        self._apply_params()
        xb = self._as_faiss_input(table[1:])
        if not index.is_trained:
            self._train(xb, C)
        index.add(xb)
        return self

    def _to_gpu(self, index, table: torch.Tensor):  # pragma: no cover - needs GPU FAISS
        dev = table.device.index if table.is_cuda and table.device.index is not None else 0
        if self.device is not None and ":" in str(self.device):
            dev = int(str(self.device).split(":")[1])
        try:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, dev, index)
        except Exception as exc:
            warnings.warn(f"FaissIndex: {self.factory!r} has no GPU version in FAISS ({exc}); using the CPU index")
            return index
        self.on_gpu = True
        self._gpu_device = dev
        return gpu_index

    def _train(self, xb: torch.Tensor, C: int) -> None:
        nlist = self._nlist
        n = self.train_size or max(64 * nlist, 10240)
        n = min(int(n), C)
        if nlist and n < nlist:
            raise ValueError(
                f"FaissIndex: {self.factory!r} needs at least nlist={nlist} training rows but the catalog has C={C}; "
                "use a smaller nlist"
            )
        gen = torch.Generator().manual_seed(self.seed)
        if n < C:
            rows = torch.randperm(C, generator=gen)[:n].sort().values.to(xb.device)
            sample = xb.index_select(0, rows).contiguous()
        else:
            sample = xb
        self.index.train(sample)

    def _as_faiss_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 contiguous; on the GPU for a GPU index, on the CPU otherwise (copies only when needed)."""
        x = x.detach()
        if self.on_gpu:
            if not x.is_cuda:
                x = x.to(f"cuda:{self._gpu_device}")
        elif x.is_cuda:
            x = x.cpu()
        if x.dtype != torch.float32:
            x = x.float()
        return x.contiguous()

    # ------------------------------------------------------------------ parameters
    def set_params(self, nprobe: int | None = None, efSearch: int | None = None) -> "FaissIndex":
        if nprobe is not None:
            self.nprobe = int(nprobe)
        if efSearch is not None:
            self.efSearch = int(efSearch)
        if self.index is not None:
            self._apply_params()
        return self

    def _apply_params(self) -> None:
        ps = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        hnsw = _hnsw_of(self.index) if self._is_hnsw else None
        if self.nprobe is not None:
            if not self._nlist:
                raise ValueError(f"FaissIndex: nprobe is an IVF parameter but {self.factory!r} has no IVF stage")
            ps.set_index_parameter(self.index, "nprobe", int(self.nprobe))
        if hnsw is not None:
            if self.efConstruction is not None:
                hnsw.efConstruction = int(self.efConstruction)
            if self.efSearch is not None:
                hnsw.efSearch = int(self.efSearch)
        elif self.efSearch is not None or self.efConstruction is not None:
            raise ValueError(f"FaissIndex: efSearch/efConstruction are HNSW parameters but {self.factory!r} is not HNSW")

    # ------------------------------------------------------------------ search / refresh
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_search(queries, k)
        out_device = queries.device
        N = queries.size(0)
        excl = normalize_exclude(exclude, N, self.num_items)
        q_all = self._as_faiss_input(queries)
        out_s, out_i = [], []
        for q0 in range(0, N, self.query_batch):
            q1 = min(N, q0 + self.query_batch)
            extra = 0
            if excl is not None:
                extra = int(excl.counts[q0:q1].max()) if q1 > q0 else 0
            kk = min(k + extra, self.num_items)
            D, I = self.index.search(q_all[q0:q1], kk)
            D, I = D.to(out_device), I.to(out_device)
            I = torch.where(I >= 0, I + 1, I)  # FAISS id j is item j + 1; -1 = no result
            s, i = finalize_topk(D, I, k, excl, row_offset=q0)
            out_s.append(s)
            out_i.append(i)
        if not out_s:
            return (torch.empty(0, k, device=out_device), torch.empty(0, k, dtype=torch.int64, device=out_device))
        return torch.cat(out_s), torch.cat(out_i)

    def refresh(self, item_table: torch.Tensor, retrain: bool = False) -> "FaissIndex":
        """Re-encode every row of the updated table; trained structures are kept unless ``retrain``."""
        table = self._check_table(item_table)
        if self.index is None or retrain or self._is_hnsw:
            return self.build(table)
        if table.size(0) - 1 != self.num_items or table.size(1) != self.dim:
            return self.build(table)
        self.index.reset()
        self.index.add(self._as_faiss_input(table[1:]))
        return self

    def memory_bytes(self) -> int:
        """Bytes of the serialized index (vectors or codes, ids, centroids, graph links)."""
        if self.index is None:
            return 0
        idx = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        return int(faiss.serialize_index(idx).size)

    def __repr__(self) -> str:
        return (f"FaissIndex({self.factory!r}, C={self.num_items}, d={self.dim}, nprobe={self.nprobe}, "
                f"efSearch={self.efSearch}, gpu={self.on_gpu})")


def _pq_friendly_dim(factory: str) -> int:
    """A dummy dimension divisible by the PQ m of the factory string (to validate it before the data exists)."""
    m = re.search(r"PQ(\d+)", factory)
    return max(8, int(m.group(1)) * 2) if m else 8


def _ivf_of(index):
    """The IndexIVF inside a CPU index (through pre-transforms / refine wrappers), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except Exception:
        return None


def _hnsw_of(index):
    """The HNSW structure of a CPU index (through a pre-transform), or None."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return getattr(idx, "hnsw", None)
