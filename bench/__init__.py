"""Benches and the study: commands that train many runs and compare them. bench/gpu/ is the harness for a lent
GPU machine (`python3 -m bench.gpu`, docs/gpu.md)."""
from dataclasses import fields, replace
from pathlib import Path


def train_config(cfg, exclude=(), **overrides):
    """The train.Config of one run of a bench command: each option that the command's config `cfg` shares with
    train.Config (same name, same meaning; `exclude` names those that only share the name) comes from `cfg`,
    the others are train's defaults, then `overrides`. One base, replaced per run: no field is listed twice."""
    import train

    ours = {f.name for f in fields(train.Config)}
    shared = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in ours and f.name not in exclude}
    shared = {k: str(v) if isinstance(v, Path) else v for k, v in shared.items()}  # train's paths are text
    return replace(train.Config(), **{**shared, **overrides})
