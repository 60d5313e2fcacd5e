"""Checkpoints: weights in safetensors, everything else in one JSON file; loading never unpickles.

    DIR/model.safetensors   the state dict
    DIR/checkpoint.json     format, model config, item vocabulary (external id of index i+1),
                            attribute names, item -> attribute table, popularity ranking,
                            provenance (dataset, epochs, metrics), weights sha256, version

`version` is a content hash of the weights and the JSON payload, so two checkpoints with the
same version serve identically; the service stores it in every user record.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import build_model
from model.protocol import ModelConfig, SeqRecModel

FORMAT, FORMAT_VERSION = "holorec-checkpoint", 1
WEIGHTS, META = "model.safetensors", "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    model: SeqRecModel
    items: list[str]  # external id of item index i + 1
    attributes: list[str] = field(default_factory=list)  # name of attribute index j + 1
    popular: list[int] = field(default_factory=list)  # item indices, most interacted first
    provenance: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        self.item_index: dict[str, int] = {x: i + 1 for i, x in enumerate(self.items)}
        self.attribute_index: dict[str, int] = {a: j + 1 for j, a in enumerate(self.attributes)}


def save(ckpt: Checkpoint, path: str | Path) -> str:
    """Write DIR/model.safetensors and DIR/checkpoint.json; returns (and sets) the version."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    save_file(weights, str(path / WEIGHTS))
    payload = _payload(ckpt)
    w_hash = _sha256((path / WEIGHTS).read_bytes())
    ckpt.version = _version(w_hash, payload)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload, "weights_sha256": w_hash, "version": ckpt.version}
    (path / META).write_text(json.dumps(meta))
    # safetensors creates its file 0600; give it the mode the JSON got from the umask, so a checkpoint
    # trained on the host is readable when bind-mounted into the container (another uid)
    (path / WEIGHTS).chmod((path / META).stat().st_mode & 0o777)
    return ckpt.version


def load(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint directory; raises CheckpointError naming the file on any problem."""
    path = Path(path)
    meta_file, weights_file = path / META, path / WEIGHTS
    for f in (meta_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a checkpoint directory holds {META} and {WEIGHTS})")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: not a holorec checkpoint (format field missing or wrong)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format_version {meta.get('format_version')} unsupported (expected {FORMAT_VERSION})")
    w_hash = _sha256(weights_file.read_bytes())
    if w_hash != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights_file}: sha256 {w_hash[:12]}... does not match checkpoint.json's weights_sha256 (tampered or corrupt)")
    payload = {k: meta[k] for k in ("config", "items", "attributes", "item_attrs", "popular", "provenance") if k in meta}
    if _version(w_hash, payload) != meta.get("version"):
        raise CheckpointError(f"{meta_file}: content does not match its version hash (edited after saving)")
    try:
        config = ModelConfig.from_dict(meta["config"])
        item_attrs = torch.tensor(meta["item_attrs"], dtype=torch.long).reshape(config.n_items + 1, config.max_attrs)
        model = build_model(config, item_attrs)
        model.load_state_dict(load_file(str(weights_file)))
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: weights do not fit the config ({type(e).__name__}: {str(e)[:300]})") from e
    if len(meta["items"]) != config.n_items:
        raise CheckpointError(f"{meta_file}: {len(meta['items'])} item ids for n_items={config.n_items}")
    model.eval()
    return Checkpoint(model, meta["items"], meta.get("attributes", []), meta.get("popular", []), meta.get("provenance", {}), meta["version"])


def _payload(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "config": ckpt.model.config.to_dict(),
        "items": list(ckpt.items),
        "attributes": list(ckpt.attributes),
        "item_attrs": ckpt.model.item_attrs.tolist(),
        "popular": [int(i) for i in ckpt.popular],
        "provenance": ckpt.provenance,
    }


def _version(weights_sha256: str, payload: dict[str, Any]) -> str:
    return _sha256((weights_sha256 + json.dumps(payload, sort_keys=True)).encode())[:16]


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()
