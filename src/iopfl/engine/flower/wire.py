"""What crosses the wire: weights as ``ArrayRecord``, everything else as JSON in a ``ConfigRecord``."""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

StateDict = dict[str, torch.Tensor]


def weights_record(weights: StateDict) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.contiguous() for k, v in weights.items()})


def record_weights(record: ArrayRecord) -> StateDict:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def json_record(**values: Any) -> ConfigRecord:
    return ConfigRecord({k: json.dumps(v) for k, v in values.items()})


def record_json(record: ConfigRecord) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in record.items()}


def content(weights: StateDict | None = None, **values: Any) -> RecordDict:
    """A message body: optional ``weights`` plus JSON ``values`` under ``info``."""
    records: dict[str, Any] = {"info": json_record(**values)}
    if weights is not None:
        records["weights"] = weights_record(weights)
    return RecordDict(records)
