"""Which kernels give wrong results under an MPS SM cap (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE): each
product of the 8B's shapes against float64 on the same inputs (nineteenth session's diagnosis:
`python3 common/bench/mps_check.py [--blas cublaslt]` under an MPS daemon with and without the cap)."""

import argparse

import torch
import torch.nn.functional as F
from disagg.common.models.argmax import greedy_argmax
from disagg.common.models.gemv import gemv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blas", choices=["cublas", "cublaslt"], default=None, help="torch's BLAS library")
    if (blas := parser.parse_args().blas) is not None:
        torch.backends.cuda.preferred_blas_library(blas)
    torch.manual_seed(0)
    dev = "cuda"
    print("SMs", torch.cuda.get_device_properties(0).multi_processor_count)
    for m, n, k in (
        (1, 4096, 4096),
        (3, 6144, 4096),
        (31, 4096, 4096),
        (300, 28672, 4096),
        (300, 128256, 4096),
    ):
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        ref = (x.double() @ w.double().T).float()
        got = F.linear(x, w).float()
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"F.linear {m}x{n}x{k}: finite {bool(torch.isfinite(got).all())} rel err {err:.2e}")
        if m <= 4:
            try:
                g = gemv(x, w, None, {"BLOCK_K": 2048, "BLOCK_N": 2, "num_warps": 4}).float()
                print(
                    f"  gemv: finite {bool(torch.isfinite(g).all())} rel err {((g - ref).norm() / ref.norm()).item():.2e}"
                )
            except Exception as e:  # noqa: BLE001
                print("  gemv failed", e)
    logits = torch.randn(4, 128256, device=dev)
    print("argmax equal", torch.equal(greedy_argmax(logits), logits.argmax(-1)))
    q = torch.randn(1, 32, 300, 128, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 300, 128, device=dev, dtype=torch.bfloat16)
    o = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(
        q.double(), kv.double(), kv.double(), is_causal=True, enable_gqa=True
    )
    print(
        "sdpa finite", bool(torch.isfinite(o).all()), "err", ((o.double() - ref).norm() / ref.norm()).item()
    )


if __name__ == "__main__":
    main()
