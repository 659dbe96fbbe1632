"""Typed schema of every config group, registered in Hydra's ConfigStore.

Hydra merges each group's YAML into these dataclasses, so an unknown key or a value of the
wrong type is rejected while composing. Cross-field rules live in `__post_init__`, which runs
when `to_schema` turns the composed config into objects: still before any data or model loads.

The schema is split by config group (model, data, training, tracking) with the root `Config` in
`root`; this package's namespace is where the rest of the code imports them from.
"""

from __future__ import annotations

from qlora_exp.schema.data import (
    CHAT_ROLES,
    DATA_FORMATS,
    DATA_SOURCES,
    PREFERENCE_FORMATS,
    DataColumnsConfig,
    DataConfig,
)
from qlora_exp.schema.model import ATTN_IMPLEMENTATIONS, COMPUTE_DTYPES, LoraConfig, ModelConfig
from qlora_exp.schema.root import CONF_DIR, Config, register_configs, to_plain_dict, to_schema
from qlora_exp.schema.tracking import MAX_TAG_LENGTH, TrackingConfig
from qlora_exp.schema.training import (
    DPO_LOSS_TYPES,
    METHODS,
    PRECISIONS,
    EvalConfig,
    MethodConfig,
    TrainerConfig,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "CHAT_ROLES",
    "COMPUTE_DTYPES",
    "CONF_DIR",
    "DATA_FORMATS",
    "DATA_SOURCES",
    "DPO_LOSS_TYPES",
    "MAX_TAG_LENGTH",
    "METHODS",
    "PRECISIONS",
    "PREFERENCE_FORMATS",
    "Config",
    "DataColumnsConfig",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "TrackingConfig",
    "TrainerConfig",
    "register_configs",
    "to_plain_dict",
    "to_schema",
]
