"""disagg.transfer: KV cache pages from a prefill server's pool to a decode server's pool over UCX.

See docs/transfer.md. Per TP rank: KVSender on prefill (rank 0 also serves the bootstrap),
KVReceiver on decode; both report finished rooms through poll().
"""

from disagg.transfer.base import TransferResult
from disagg.transfer.bootstrap import BootstrapError, BootstrapServer
from disagg.transfer.layout import KVLayout, KVLayoutMismatchError, dtype_name, head_range, plan_head_slices
from disagg.transfer.receiver import KVReceiver
from disagg.transfer.sender import KVSender

__all__ = [
    "BootstrapError",
    "BootstrapServer",
    "KVLayout",
    "KVLayoutMismatchError",
    "KVReceiver",
    "KVSender",
    "TransferResult",
    "dtype_name",
    "head_range",
    "plan_head_slices",
]
