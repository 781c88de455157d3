"""What crosses the wire, in Flower's record types.

Server → site (``train`` / ``evaluate`` / ``query.publish``; ``query`` has no weights):
  ``arrays``  ArrayRecord   the global weights θ (``query.publish``: the val-selected global model)
  ``config``  ConfigRecord  ``round``, ``run-key`` (names the run for the site's state store) and
                            ``iopfl-config`` (the resolved iopfl config as JSON: sites need no file);
                            ``query.publish`` adds ``overlay`` (draw this site's overlay, at the site)
Site → server, ``train``:
  ``arrays``  ArrayRecord   exactly the weights the strategy sends (``ClientReply.weights``)
  ``metrics`` MetricRecord  ``num-examples`` (the sample count n_k) and the strategy's metrics (loss)
  ``info``    ConfigRecord  ``site``
Site → server, ``evaluate``:
  ``info``    ConfigRecord  ``site``, ``scores`` (JSON: model → split → summary) and ``best`` (JSON:
                            round, val Dice and test metrics of the site's val-selected personalised
                            model — its summary; the model itself stays at the site)
Site → server, ``query``:
  ``info``    ConfigRecord  ``site``, ``num-examples``, ``network`` (JSON: channels, classes, sizes),
                            ``device`` (JSON: where the site computes — device, precision, versions)
Site → server, ``query.publish``:
  ``info``    ConfigRecord  ``site``, ``published`` (JSON bool)
  ``arrays``  ArrayRecord   the site's val-selected personalised model — only when its node config
                            opts in (``publish-personal='true'``)

Personal state (φ_k, heads, norm layers) is never put in a reply; the selected personalised model only
in a ``query.publish`` reply of a site that opted in.

Weights travel packed: the ArrayRecord holds two arrays, ``index`` (JSON: each tensor's name, dtype,
shape and byte range) and ``data`` (every tensor's bytes, concatenated), instead of one array per
tensor. Flower moves every array (and every 5 MB chunk of one) as its own HTTP request on each hop
(ServerApp → SuperLink → SuperNode → ClientApp and back); a U-Net has ~60 tensors, so one array per
tensor cost ~5 s of requests per phase on loopback, and far more over a WAN. Packing is a bit-exact
copy of every tensor (any dtype), so a deployment's numbers equal the in-process engine's.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from iopfl.models.factory import StateDict

NUM_EXAMPLES = "num-examples"


def pack_weights(weights: StateDict) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(index, bytes) of a state dict: each tensor's name, dtype, shape and byte range in ``bytes``."""
    index, chunks, offset = [], [], 0
    for name, tensor in weights.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        index.append(
            {
                "name": name,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": raw.numel(),
            }
        )
        chunks.append(raw.numpy())
        offset += raw.numel()
    data = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint8)
    return index, data


def unpack_weights(index: list[dict[str, Any]], data: np.ndarray) -> StateDict:
    buffer = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    out = {}
    for item in index:
        raw = buffer[item["offset"] : item["offset"] + item["nbytes"]].clone()
        out[item["name"]] = raw.view(getattr(torch, item["dtype"])).reshape(item["shape"])
    return out


def weights_record(weights: StateDict) -> ArrayRecord:
    index, data = pack_weights(weights)
    blob = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    return ArrayRecord({"index": Array(blob), "data": Array(data)})


def record_weights(record: ArrayRecord) -> StateDict:
    index = json.loads(record["index"].numpy().tobytes().decode())
    return unpack_weights(index, record["data"].numpy())


def record_weight_names(record: ArrayRecord) -> list[str]:
    """The tensor names a weights record carries (for inspecting what a message sends)."""
    return [item["name"] for item in json.loads(record["index"].numpy().tobytes().decode())]


def instruction(
    config_json: str, round_: int, run_key: str, weights: StateDict | None = None, **extra: bool | int | float | str
) -> RecordDict:
    """The body of a server → site message (``extra``: further config values of that message)."""
    records: dict[str, Any] = {
        "config": ConfigRecord({"round": round_, "run-key": run_key, "iopfl-config": config_json, **extra})
    }
    if weights is not None:
        records["arrays"] = weights_record(weights)
    return RecordDict(records)


def _number(record: ConfigRecord | MetricRecord, key: str) -> int | float:
    """The number this module wrote under ``key`` (a record's values may also be lists, bytes, ...)."""
    value = record[key]
    if not isinstance(value, int | float):
        raise TypeError(f"message field '{key}': expected a number, got {type(value).__name__}")
    return value


def read_instruction(content: RecordDict) -> tuple[dict[str, Any], int, str, StateDict | None]:
    """(config tree, round, run key, global weights or None) of a server → site message."""
    cfg = content.config_records["config"]
    weights = record_weights(content.array_records["arrays"]) if "arrays" in content else None
    return json.loads(str(cfg["iopfl-config"])), int(_number(cfg, "round")), str(cfg["run-key"]), weights


def publish_reply(site: str, weights: StateDict | None) -> RecordDict:
    """A site's answer to ``query.publish``: its personalised model, or nothing when it did not opt in."""
    body = info_reply(site, published=weights is not None)
    if weights is not None:
        body["arrays"] = weights_record(weights)
    return body


def read_publish_reply(content: RecordDict) -> StateDict | None:
    return record_weights(content.array_records["arrays"]) if read_info(content)["published"] else None


def train_reply(site: str, weights: StateDict, num_samples: int, metrics: dict[str, Any]) -> RecordDict:
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != NUM_EXAMPLES}
    return RecordDict(
        {
            "arrays": weights_record(weights),
            "metrics": MetricRecord({NUM_EXAMPLES: int(num_samples), **numbers}),
            "info": ConfigRecord({"site": site}),
        }
    )


def read_train_reply(content: RecordDict) -> tuple[str, StateDict, int, dict[str, float]]:
    """(site, sent weights, sample count, metrics) of a train reply."""
    record = content.metric_records["metrics"]
    n = int(_number(record, NUM_EXAMPLES))
    metrics = {k: float(_number(record, k)) for k in record if k != NUM_EXAMPLES}  # floats: see train_reply
    return str(content["info"]["site"]), record_weights(content.array_records["arrays"]), n, metrics


def info_reply(site: str, **values: Any) -> RecordDict:
    """A reply whose values are JSON under ``info`` (evaluate, query)."""
    return RecordDict({"info": ConfigRecord({"site": site, **{k: json.dumps(v) for k, v in values.items()}})})


def read_info(content: RecordDict) -> dict[str, Any]:
    info = content["info"]
    return {k: (str(v) if k == "site" else json.loads(str(v))) for k, v in info.items()}
