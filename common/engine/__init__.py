"""The engine both server roles share: requests, KV pool, prefix cache, scheduler, model runner,
attention backends, CUDA graphs, sampling. `Engine` is the offline API (`engine/offline.py`)."""

from __future__ import annotations


def __getattr__(name: str):
    # NOTE: lazy, so importing one engine module (e.g. engine.request) does not load the whole engine
    if name in ("Engine", "to_sampling_params"):
        from disagg.common.engine import offline

        return getattr(offline, name)
    raise AttributeError(name)
