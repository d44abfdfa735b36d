"""One fine-tuning run (full / LoRA / MeProp / SparseGrad) on SST-2 (MiniLM) or tiny Shakespeare (SmolLM2).

Shared by ``scalerec finetune`` and ``benchmarks/sparsegrad_sst2.py``. The methods differ only in which
parameters train and how: the same model, data order, head, steps and seeds.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn

from scalerec.peft.config import LLAMA_MLP_TARGETS_WITH_GATE, MePropConfig, SparseGradConfig, find_targets
from scalerec.peft.data import (classification_batches, lm_batches, lm_blocks, read_shakespeare, read_sst2,
                                resolve_model)
from scalerec.peft.lora import apply_lora, matched_lora_rank
from scalerec.peft.sparsegrad import (SparseGradOptimizer, apply_meprop, apply_sparsegrad, count_trainable,
                                      freeze_except_head, sparse_layers)

METHODS = ("sparsegrad", "meprop", "lora", "full")
TASKS = ("sst2", "shakespeare")
HEAD_NAMES = ("classifier", "score")
DEFAULT_LR = {"sparsegrad": 1e-3, "meprop": 1e-3, "lora": 1e-3, "full": 5e-5}


@dataclass
class FinetuneSettings:
    method: str = "sparsegrad"
    model: str = "minilm"
    task: str = "sst2"
    steps: int = 300
    batch_size: int = 32
    lr: float | None = None          # the method's parameters (None: DEFAULT_LR[method])
    head_lr: float = 2e-3            # the fresh classification head
    density: float = 0.01
    grad_dtype: str = "float32"      # SparseGrad/MeProp weight-gradient GEMMs: float32 or bfloat16
    calibration_steps: int = 20
    lora_rank: int | None = None     # None: matched to SparseGrad's k per layer
    lora_alpha: float | None = None
    include_gate: bool = False       # LLaMA: also target gate_proj
    seed: int = 0
    max_length: int = 64
    block: int = 64                  # causal LM: tokens per block
    train_limit: int | None = None   # SST-2: use the first N rows of the bundled training subset
    eval_limit: int | None = None    # SST-2 dev rows (None: all 872) / LM held-out blocks
    data_dir: str | None = None
    text: str | None = None
    threads: int | None = None
    device: str = "cpu"              # "cpu", "cuda" or "cuda:N"
    sparse_state: str = "auto"       # SparseGrad/MeProp Adam moments: auto (= compact), compact or dense
    fused_optimizer: bool = True     # SparseGrad/MeProp: the lazy-Adam step as one C++ call (False: its Python reference)
    tensor_memory: bool = False      # CPU: tensor_peak_mb, the live-tensor peak of a step at the run's longest batch

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        for name in ("steps", "batch_size", "calibration_steps", "max_length", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.tensor_memory and not str(self.device).startswith("cpu"):
            raise ValueError(f"tensor_memory needs device=cpu (on a GPU the allocator's peak is reported anyway), "
                             f"got device={self.device!r}")
        if not (0.0 < float(self.density) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.sparse_state not in SparseGradOptimizer.STATE_LAYOUTS:
            raise ValueError(f"sparse_state must be one of {list(SparseGradOptimizer.STATE_LAYOUTS)}, "
                             f"got {self.sparse_state!r}")
        if not isinstance(self.fused_optimizer, bool):
            raise ValueError(f"fused_optimizer must be true or false, got {self.fused_optimizer!r}")
        if self.device != "cpu" and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @classmethod
    def from_overrides(cls, base: dict, overrides: list[str]) -> "FinetuneSettings":
        """Apply ``key=value`` strings (types from the dataclass fields) over ``base``."""
        types = {f.name: f.type for f in fields(cls)}
        out = dict(base)
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            key, val = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in types:
                raise ValueError(f"unknown setting {key!r}; allowed: {', '.join(sorted(types))}")
            t = str(types[key])
            if val.lower() in ("none", "null") and "None" in t:
                out[key] = None
            elif t.startswith("int"):
                out[key] = int(val)
            elif t.startswith("float"):
                out[key] = float(val)
            elif t.startswith("bool"):
                if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"{key} must be true/false, got {val!r}")
                out[key] = val.lower() in ("1", "true", "yes")
            else:
                out[key] = val
        return cls(**out)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _on(batches, device: torch.device):
    """The batches (dicts of tensors) moved to ``device``."""
    for b in batches:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


def _cuda_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


def _load(s: FinetuneSettings):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf = resolve_model(s.model)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    torch.manual_seed(s.seed)  # the fresh head is the same for every method at one seed
    if s.task == "sst2":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # a GGUF checkpoint is dequantized to float32 on load; transformers then refuses .float()
        return model, tok
    return model.float(), tok


def _targets(s: FinetuneSettings, model: nn.Module) -> list[str] | None:
    if s.task == "shakespeare" and s.include_gate:
        return list(LLAMA_MLP_TARGETS_WITH_GATE)
    return None


def _named_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float = 0.0) -> list[dict]:
    head, body = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (head if any(h in n.split(".") for h in HEAD_NAMES) else body).append(p)
    groups = [{"params": body, "lr": lr, "weight_decay": weight_decay}]
    if head:
        groups.append({"params": head, "lr": head_lr, "weight_decay": weight_decay})
    return groups


def setup_method(s: FinetuneSettings, model: nn.Module, calibration_batches=None):
    """Apply the method to ``model``; returns (model, optimizer, info dict)."""
    lr = s.lr if s.lr is not None else DEFAULT_LR[s.method]
    targets = _targets(s, model)
    info: dict[str, Any] = {}
    if s.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(_named_groups(model, lr, s.head_lr), lr=lr, weight_decay=0.0)
        info["trainable"] = count_trainable(model)
    elif s.method == "lora":
        rank = s.lora_rank or matched_lora_rank(model, targets, density=s.density)
        for p in model.parameters():
            p.requires_grad_(False)
        heads = [h for h in HEAD_NAMES if any(h in n.split(".") for n, _ in model.named_modules())]
        model = apply_lora(model, targets, rank, s.lora_alpha, modules_to_save=heads)
        opt = torch.optim.AdamW(_named_groups(model, lr, s.head_lr), lr=lr, weight_decay=0.0)
        info.update(lora_rank=rank, trainable=count_trainable(model))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if s.method == "sparsegrad":
            cfg = SparseGradConfig(target_modules=targets, density=s.density, calibration_steps=s.calibration_steps,
                                   grad_dtype=s.grad_dtype)
            t0 = time.perf_counter()
            apply_sparsegrad(model, cfg, calibration_data=calibration_batches)
            info["calibration_s"] = time.perf_counter() - t0
        else:
            apply_meprop(model, MePropConfig(target_modules=targets, density=s.density, grad_dtype=s.grad_dtype))
        freeze_except_head(model, HEAD_NAMES)
        opt = SparseGradOptimizer(model, lr=lr, sparse_lr=lr, head_lr=s.head_lr, head_names=HEAD_NAMES,
                                  state_layout=s.sparse_state, fused=s.fused_optimizer)
        info["k_per_layer"] = {n: m.k for n, m in sparse_layers(model)[:2]}
        info["trainable"] = count_trainable(model)
    info["lr"] = lr
    info["mlp_budget_per_step"] = _mlp_budget(model)
    return model, opt, info


def _mlp_budget(model: nn.Module) -> int:
    """Parameters of the targeted MLP weights that change per step (k per SparseGrad/MeProp layer, LoRA A+B)."""
    sl = sparse_layers(model)
    if sl:
        return sum(m.k for _, m in sl)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> dict:
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum, tokens = 0.0, 0
    for b in batches:
        out = model(**b)
        if out.logits.dim() == 2:  # classification
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
            total += b["labels"].numel()
        else:
            n = b["labels"][:, 1:].numel()
            loss_sum += float(out.loss) * n
            tokens += n
    model.train(was)
    if total:
        return {"accuracy": correct / total, "n": total}
    return {"loss": loss_sum / tokens, "perplexity": math.exp(loss_sum / tokens), "tokens": tokens}


def _tokens(batch: dict) -> int:
    return int(batch["input_ids"].numel())  # batch size x padded length


def tensor_peak(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> dict:
    """The CPU live-tensor peak of a training step on ``batch`` with the optimizer state as it is now (after the
    run): two steps under torch's memory profiler (``scalerec.peft.memory``), the second measured. Given the run's
    longest batch after its last step, this is the analogue of ``torch.cuda.max_memory_allocated`` over the run:
    activations peak with the longest batch and the lazy-Adam state only grows, so no step of the run peaks higher
    (a step at that length with the final state is what the GPU's whole-run peak sees at worst). The trainable
    weights and the optimizer state are restored afterwards, so the run's model is left as trained."""
    import copy

    from scalerec.peft.memory import live_tensor_bytes, peak_tensor_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    kept = [p.detach().clone() for p in params]
    kept_state = copy.deepcopy(opt.state_dict())

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak = peak_tensor_bytes(work=step, warmup=step,
                             live_at_start=lambda: live_tensor_bytes(batch, model=model, optimizer=opt))
    with torch.no_grad():
        for p, q in zip(params, kept):
            p.copy_(q)
    opt.load_state_dict(kept_state)
    for m in model.modules():
        if hasattr(m, "accept_weight_change"):
            m.accept_weight_change()
    return {"tensor_peak_mb": peak / 2**20, "tensor_model_mb": live_tensor_bytes(model=model) / 2**20,
            "tensor_peak_tokens": _tokens(batch)}


def run_finetune(s: FinetuneSettings, log: Callable[[dict], None] | None = None, progress: bool = True,
                 keep_model: bool = False) -> dict:
    """Load, apply the method, train ``s.steps`` steps, evaluate before/after; returns the figures (and the model
    under ``"_model"`` when ``keep_model``)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    dev = torch.device(s.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda: torch sees no GPU here")
    torch.manual_seed(s.seed)
    model, tok = _load(s)
    model.to(dev)
    if s.task == "sst2":
        tr_x, tr_y = read_sst2("train", s.data_dir, s.train_limit)
        dv_x, dv_y = read_sst2("dev", s.data_dir, s.eval_limit)
        train_it = _on(classification_batches(tok, tr_x, tr_y, s.batch_size, s.seed, s.max_length), dev)
        calib_it = _on(classification_batches(tok, tr_x, tr_y, s.batch_size, s.seed + 1000, s.max_length), dev)

        def eval_batches():
            return _on(classification_batches(tok, dv_x, dv_y, 128, 0, s.max_length, shuffle=False), dev)
    else:
        train_blocks, test_blocks = lm_blocks(tok, read_shakespeare(s.text), s.block)
        if s.eval_limit:
            test_blocks = test_blocks[: s.eval_limit]
        train_it = _on(lm_batches(train_blocks, s.batch_size, s.seed), dev)
        calib_it = _on(lm_batches(train_blocks, s.batch_size, s.seed + 1000), dev)

        def eval_batches():
            return _on(lm_batches(test_blocks, 16, 0, shuffle=False), dev)

    before = evaluate(model, eval_batches()) if s.task == "shakespeare" else None
    rss_loaded = peak_rss_mb()
    cuda = dev.type == "cuda"
    if cuda:  # GPU memory: torch's allocator peak (the CUDA context and allocator cache are not counted)
        torch.cuda.synchronize(dev)
        cuda_loaded = torch.cuda.memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
    model, opt, info = setup_method(s, model, calib_it)
    info["rss_after_setup_mb"] = peak_rss_mb()  # peak so far: load + the method's set-up (SparseGrad: calibration)
    if cuda:
        info["cuda_after_setup_peak_mb"] = _cuda_mb(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=s.steps, desc=f"{s.method}", disable=not progress, leave=False)
    warm = min(3, s.steps - 1)
    t_start = None
    losses = []
    longest = None  # the run's batch with the most tokens (the tensor_memory measurement's batch)

    def train_step(step: int, batch) -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        bar.update(1)
        if progress or log is not None:  # the value now: on a GPU a host sync, which the timed runs go without
            value = float(losses[-1])
            bar.set_postfix(loss=f"{value:.4f}")
            if log is not None:
                log({"event": "step", "step": step, "loss": value, "time": time.time()})

    for step, batch in enumerate(itertools.islice(train_it, s.steps), start=1):
        if step == warm + 1:
            if cuda:
                torch.cuda.synchronize(dev)
            t_start = time.perf_counter()
        train_step(step, batch)
        if s.tensor_memory and (longest is None or _tokens(batch) > _tokens(longest)):
            longest = batch
    if cuda:
        torch.cuda.synchronize(dev)
    t_end = time.perf_counter()
    bar.close()
    losses = torch.stack(losses).float().tolist() if losses else []
    if cuda:
        torch.cuda.synchronize(dev)
        info["device"] = torch.cuda.get_device_name(dev)
        info["cuda_after_load_mb"] = cuda_loaded
        info["cuda_train_peak_mb"] = _cuda_mb(dev)  # the training loop's peak (model, optimizer state, activations)
    elapsed = t_end - t_start if t_start is not None else float("nan")
    rss_train = peak_rss_mb()
    # entries with Adam moments on the rotated weights (SparseGrad/MeProp): the union of the selected entries (those
    # with a step count > 0, in either layout), and the bytes that the lazy-Adam state holds for them
    sparse = [st for st in opt.state.values() if "t" in st]
    info["sparse_state_entries"] = sum(int(st["t"].count_nonzero()) for st in sparse)
    if hasattr(opt, "size_reads"):
        info["sparse_size_reads"] = opt.size_reads  # the compact sets' sizes taken on the host (non-blocking copies)
    info["sparse_state_mb"] = sum(st[n].numel() * st[n].element_size() for st in sparse
                                  for n in ("words", "m", "v", "t") if n in st) / 2**20
    timed = s.steps - warm
    after = evaluate(model, eval_batches())
    if s.tensor_memory:
        info.update(tensor_peak(model, opt, longest))
    res = {
        "method": s.method, "task": s.task, "seed": s.seed, "steps": s.steps, "batch_size": s.batch_size,
        "steps_per_s": timed / elapsed if elapsed > 0 else float("nan"),
        "train_loss_first": losses[0], "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "peak_rss_mb": rss_train, "rss_after_load_mb": rss_loaded, "threads": torch.get_num_threads(),
        **info,
    }
    if s.task == "sst2":
        res["dev_accuracy"] = after["accuracy"]
    else:
        res["heldout_loss_before"] = before["loss"]
        res["heldout_loss_after"] = after["loss"]
    res["settings"] = asdict(s)
    if log is not None:
        log({"event": "result", **res})
    if keep_model:
        res["_model"] = model
    return res


def jsonl_logger(path: str) -> Callable[[dict], None]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, "a", encoding="utf-8")

    def log(rec: dict) -> None:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()

    return log


