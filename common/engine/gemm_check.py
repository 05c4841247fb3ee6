"""Start-up check of the model's GEMMs where the process runs on part of a GPU's SMs (an MPS SM cap).

Found on an H100 (torch 2.11, CUDA 13, nineteenth session, docs/benchmarks.md): under
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=85` (112 of 132 SMs) cuBLAS's bf16 GEMMs of [300 x 4096] by the
8B's gate_up and LM head weights returned NaN and garbage (with either of torch's BLAS libraries);
at 50% and 100% they were right. A server that computes wrong products would answer every request
with noise or, since the engine checks logits, with errors. So where such a cap is set, each distinct
dense weight shape of the model is multiplied at a few prefill sizes against a float64 product of
the same operands before the server starts; a wrong one stops the start-up with a clear error
(naming the shape and the cap), instead of a deployment that fails every request.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CHECK_TOKENS = (64, 300, 1024, 4096)  # prefill sizes probed (cuBLAS picks its kernel by shape)
MAX_REL_ERR = 2e-2  # bf16 products against float64: ~2e-3 when right; NaN or ~1 when wrong
_REF_ROWS = 4096
_HALF = (torch.bfloat16, torch.float16)


def dense_weight_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct [N, K] of the model's 2-D half-precision weights: the linears and the LM head (a
    tied one is the embedding's [V, H], so that shape is kept too); FP8 weights and expert stacks
    (Triton kernels) are not cuBLAS's."""
    return sorted({tuple(p.shape) for p in model.parameters() if p.dim() == 2 and p.dtype in _HALF})


def check_gemms(
    shapes: list[tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    sm_percent: int,
    tokens: tuple[int, ...] = CHECK_TOKENS,
    linear=F.linear,
) -> None:
    """Raise RuntimeError at the first product of `linear` that is not finite or is off its float64
    value by more than MAX_REL_ERR (relative norm) for x [M, K] @ w [N, K]^T, M in `tokens`."""
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
        for m in tokens:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            got = linear(x, w)  # the whole product: the kernel is chosen for this shape
            # the float64 reference a slice of rows at a time (an LM head's [4096 x V] float64 is GBs)
            diff = norm = 0.0
            for lo in range(0, n, _REF_ROWS):
                want = x.double() @ w[lo : lo + _REF_ROWS].double().T
                diff += (got[:, lo : lo + _REF_ROWS].double() - want).pow(2).sum().item()
                norm += want.pow(2).sum().item()
            err = (diff / norm) ** 0.5 if norm else 0.0
            if not (err <= MAX_REL_ERR):  # NaN too
                raise RuntimeError(
                    f"the GPU's matrix products are wrong under this process's MPS SM cap "
                    f"(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={sm_percent}): [{m} x {k}] @ [{k} x {n}] in {dtype} "
                    f"is off by {err:.3g} (relative) from float64; the server would answer with noise. Give "
                    f"it another share (on an H100 50, 90 and 95 were right; 40 and 55-85 were not) or none"
                )
        del w, x, got
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probes' memory back before the KV pool is sized
    logger.info("GEMMs checked under an MPS SM cap of %d%%: %d shapes x %d sizes right", sm_percent, len(shapes),
                len(tokens))  # fmt: skip
