"""The CPU peak of live tensor memory (scalerec.peft.memory), the analogue of the GPU allocator's peak."""
import pytest
import torch

from scalerec.peft.memory import live_tensor_bytes, peak_tensor_bytes
from scalerec.peft.train import FinetuneSettings


def test_peak_tensor_bytes_counts_live_tensors_temporaries_and_frees():
    """4 MB alive before profiling, 2 MB made in the warm-up and freed in the work, then 8 + 8 MB at once: the
    peak is 20 MB (the 2 MB freed first), not 22 and not the 16 MB allocated during the work alone."""
    keep = {}
    a = torch.zeros(1000, 1000)

    def warmup():
        keep["x"] = torch.ones(500, 1000)

    def work():
        del keep["x"]
        y = torch.ones(2000, 1000)
        z = y * 2
        del y, z

    peak = peak_tensor_bytes(work, warmup, lambda: live_tensor_bytes(a, keep))
    assert abs(peak - 20_000_000) < 1_000
    assert live_tensor_bytes(a, [a, a[:10]], {"k": a}) == 4_000_000  # one storage counted once


def test_live_tensor_bytes_of_model_and_optimizer_state():
    lin = torch.nn.Linear(100, 50)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(3, 100)).sum().backward()
    opt.step()
    params = (100 * 50 + 50) * 4
    # parameters, their gradients, and Adam's two moments (its float step counts: 4 bytes each)
    assert live_tensor_bytes(model=lin, optimizer=opt) == 4 * params + 2 * 4
    with pytest.raises(ValueError, match="tensor_memory needs device=cpu"):
        FinetuneSettings(method="lora", steps=3, tensor_memory=True, device="cuda:0")
