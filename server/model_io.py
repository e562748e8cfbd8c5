"""The model on the server's disk: ingest a Hugging Face folder, export the merged model.

The server keeps θ as one float32 safetensors file per round and never loads the model as a
whole; the public files (config, tokenizer) are copied next to it and served to workers.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pum.common.codec import SafetensorsFile, TensorInfo, save_file_atomic
from pum.common.errors import InvalidInput

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors file(s) of a Hugging Face model folder, shards in index order."""
    if not (model_dir / "config.json").is_file():
        raise InvalidInput(f"model_dir {model_dir} has no config.json: give a Hugging Face model folder")
    index = model_dir / WEIGHT_INDEX
    if index.is_file():
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / name for name in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise InvalidInput(
        f"model_dir {model_dir} has no model.safetensors: PUM reads safetensors only "
        "(convert .bin checkpoints with save_pretrained(safe_serialization=True))"
    )


def public_files(model_dir: Path) -> list[Path]:
    """Everything in the folder a worker may see: config, generation config, tokenizer files."""
    return sorted(
        p for p in model_dir.iterdir()
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != WEIGHT_INDEX
    )


def ingest_model(model_dir: Path, theta_path: Path, public_dir: Path) -> dict[str, str]:
    """Copy the weights to `theta_path` as float32 and the public files to `public_dir`.

    Returns the original dtype of every tensor, for the export.
    """
    dtypes = ingest_weights(model_dir, theta_path, "model_dir")
    public_dir.mkdir(parents=True, exist_ok=True)
    for path in public_files(model_dir):
        shutil.copy2(path, public_dir / path.name)
    return dtypes


def ingest_weights(model_dir: Path, out_path: Path, what: str) -> dict[str, str]:
    """The weights of a Hugging Face folder as one float32 file; returns the original dtypes."""
    if not model_dir.is_dir():
        raise InvalidInput(f"{what} {model_dir} is not a folder on the server")
    shards = [SafetensorsFile(path) for path in weight_files(model_dir)]
    try:
        located = {info.name: (shard, info) for shard in shards for info in shard.infos}
        floats = [info for _, info in located.values() if info.dtype in ("F32", "F16", "BF16", "F64")]
        if len(floats) != len(located):
            others = sorted(set(located) - {i.name for i in floats})
            raise InvalidInput(f"model has non-float tensors PUM cannot perturb: {others[:5]}")
        infos = [TensorInfo(i.name, "F32", i.shape) for i in floats]
        save_file_atomic(out_path, infos, (located[i.name][0].read(i.name).float() for i in infos), private=True)
    finally:
        for shard in shards:
            shard.close()
    return {info.name: info.dtype for info in floats}


def export_model(theta_path: Path, dtypes: dict[str, str], public_dir: Path, out_dir: Path) -> Path:
    """Write θ in Hugging Face format (model.safetensors in the original dtypes, config, tokenizer)."""
    from pum.common.codec import DTYPES

    out_dir.mkdir(parents=True, exist_ok=True)
    with SafetensorsFile(theta_path) as theta:
        infos = [TensorInfo(i.name, dtypes.get(i.name, "F32"), i.shape) for i in theta.infos]
        tensors = (theta.read(i.name).to(DTYPES[i.dtype]) for i in infos)
        save_file_atomic(out_dir / "model.safetensors", infos, tensors, metadata={"format": "pt"})
    for path in public_dir.iterdir():
        shutil.copy2(path, out_dir / path.name)
    log.info("saved merged model to %s", out_dir)
    return out_dir
