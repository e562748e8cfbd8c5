"""The model on the server's disk: ingest a Hugging Face folder, export the merged model.

The server keeps θ as one float32 safetensors blob per round (`JobFiles`), under the model's
own tensor names (`model_layout`), and never loads the model as a whole; the public files
(config, generation config, tokenizer: `pum.common.model_files.PUBLIC_FILES`) are copied next to
it and served to workers. Nothing that leaves the folder through a link is read, and a config that
would make a worker's transformers load code is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from pum.common.codec import DTYPES, SafetensorsFile, TensorInfo, total_size
from pum.common.errors import InvalidInput
from pum.common.model_files import PUBLIC_FILES, code_loading_keys, is_plain_file_name

from .blobs import BlobStore
from .job_files import JobFiles
from .model_layout import match_checkpoint

log = logging.getLogger(__name__)

WEIGHT_INDEX = "model.safetensors.index.json"
FLOATS = ("F32", "F16", "BF16", "F64")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors file(s) of a Hugging Face model folder, shards in index order."""
    index = model_dir / WEIGHT_INDEX
    if index.is_file():
        return [model_dir / name for name in dict.fromkeys(_weight_map(model_dir).values())]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [_inside(single, model_dir)]
    raise InvalidInput(
        f"model_dir {model_dir} has no model.safetensors: PUM reads safetensors only "
        "(convert .bin checkpoints with save_pretrained(safe_serialization=True))"
    )


def _weight_map(model_dir: Path) -> dict[str, str]:
    """The index's tensor → shard map, its shards plain files of the folder; InvalidInput saying what is wrong."""
    index = _inside(model_dir / WEIGHT_INDEX, model_dir)
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidInput(
            f"{index} is not a safetensors index: it needs a non-empty \"weight_map\" of tensor name → shard file "
            "(re-save the model with save_pretrained, or remove the index next to a single model.safetensors)"
        )
    shards = list(dict.fromkeys(weight_map.values()))
    if odd := [name for name in shards if not is_plain_file_name(name)]:
        raise InvalidInput(f"{index} names shards that are not plain file names of the folder: {odd[:5]}")
    if absent := [name for name in shards if not (model_dir / name).is_file()]:
        raise InvalidInput(f"{index} names shards missing from {model_dir}: {absent[:5]}")
    for name in shards:
        _inside(model_dir / name, model_dir)
    return weight_map


def check_config(model_dir: Path) -> None:
    """The folder's config.json must be a JSON object that makes transformers load no code."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise InvalidInput(f"model_dir {model_dir} has no config.json: give a Hugging Face model folder")
    if not isinstance(_read_json(_inside(path, model_dir)), dict):
        raise InvalidInput(f"{path} is not a JSON object: give the folder its Hugging Face config")
    refuse_code([path])


def public_files(model_dir: Path) -> list[Path]:
    """The files a worker needs (config, generation config, tokenizer files) that the folder has.

    Only names in PUBLIC_FILES, only regular files that stay in the folder: never dotfiles,
    READMEs, licences, stale indexes, sub-folders such as original/, or links out of the folder.
    """
    found = []
    for name in sorted(PUBLIC_FILES):
        path = model_dir / name
        if not path.is_file():
            continue
        if not _stays_inside(path, model_dir):
            log.warning("not publishing %s: it links out of the model folder", path)
            continue
        found.append(path)
    return found


def refuse_code(paths: list[Path]) -> None:
    """InvalidInput when a JSON file to publish would make a worker's transformers load code."""
    for path in paths:
        if path.suffix == ".json" and (found := code_loading_keys(_read_json(path), path.name)):
            raise InvalidInput(
                f"{path} makes transformers load code ({', '.join(found)}): workers refuse such a model; "
                "PUM runs transformers' built-in architectures only, unquantized"
            )


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise InvalidInput(f"{path} is not valid UTF-8 JSON: re-save the model with save_pretrained") from None


def ingest_model(model_dir: Path, files: JobFiles) -> dict[str, str]:
    """Copy the weights to θ of round 1 as float32 and the public files next to them.

    Returns the original dtype of every tensor, for the export.
    """
    if not model_dir.is_dir():
        raise InvalidInput(f"model_dir {model_dir} is not a folder on the server")
    published = public_files(model_dir)
    refuse_code(published)
    dtypes = ingest_weights(model_dir, files, files.theta(1), "model_dir")
    for path in published:
        files.import_file(files.public(path.name), path)
    return dtypes


def ingest_weights(model_dir: Path, files: JobFiles, name: str, what: str) -> dict[str, str]:
    """The weights of a Hugging Face folder as the job's float32 blob `name`, under the model's own tensor names.

    Returns the original dtypes. Refuses a folder whose weights do not fit its config.
    """
    if not model_dir.is_dir():
        raise InvalidInput(f"{what} {model_dir} is not a folder on the server")
    check_config(model_dir)
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(SafetensorsFile(path)) for path in weight_files(model_dir)]
        located = _locate(model_dir, shards)
        match = match_checkpoint(model_dir, [info for _, info in located.values()])
        kept = [located[name][1] for name in match.names]
        if others := [info.name for info in kept if info.dtype not in FLOATS]:
            raise InvalidInput(f"model has non-float tensors PUM cannot perturb: {others[:5]}")
        infos = [TensorInfo(match.names[i.name], "F32", i.shape) for i in kept]
        files.blobs.check_space(total_size(infos), f"the job's float32 copy of {what}")
        tensors = (located[i.name][0].read(i.name).float() for i in kept)
        files.write_safetensors(name, infos, tensors)
    return {match.names[info.name]: info.dtype for info in kept}


def _locate(model_dir: Path, shards: list[SafetensorsFile]) -> dict[str, tuple[SafetensorsFile, TensorInfo]]:
    """tensor name → (its shard, its info); refuses a tensor in two shards or an index that disagrees."""
    located: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    for shard in shards:
        for info in shard.infos:
            if info.name in located:
                raise InvalidInput(f"tensor {info.name} is in two shards of {model_dir}: "
                                   f"{Path(located[info.name][0].path).name} and {Path(shard.path).name}")
            located[info.name] = (shard, info)
    if (model_dir / WEIGHT_INDEX).is_file():
        weight_map = _weight_map(model_dir)
        wrong = [
            name for name, shard in weight_map.items()
            if name not in located or Path(located[name][0].path).name != shard
        ]
        unlisted = sorted(set(located) - set(weight_map))
        if wrong or unlisted:
            raise InvalidInput(
                f"{model_dir / WEIGHT_INDEX} does not match its shards (stale index?): "
                f"listed but not in that shard {wrong[:5]}, in a shard but not listed {unlisted[:5]}; "
                "re-save the model with save_pretrained"
            )
    return located


def _stays_inside(path: Path, model_dir: Path) -> bool:
    """Whether `path` resolves inside the model folder, or, for a Hugging Face cache snapshot
    (…/snapshots/<revision>/, whose files link to ../../blobs/), inside that repository's blobs."""
    target, root = path.resolve(), model_dir.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    return any(target.is_relative_to(r) for r in roots)


def _inside(path: Path, model_dir: Path) -> Path:
    if not _stays_inside(path, model_dir):
        raise InvalidInput(f"{path} links out of the model folder: copy the file into the folder")
    return path


def input_shard_bytes(model_dir: Path, default: int = 5 * 10**9) -> int:
    """The tensor bytes of the largest shard of a sharded input (the export shards like it), else Hugging
    Face's default."""
    shards = weight_files(model_dir)
    if len(shards) == 1:
        return default
    sizes = []
    for path in shards:
        with SafetensorsFile(path) as shard:
            sizes.append(sum(info.nbytes for info in shard.infos))
    return max(sizes)


def shard_plan(infos: list[TensorInfo], shard_bytes: int) -> list[list[TensorInfo]]:
    """The tensors in order, cut into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def export_model(files: JobFiles, theta: str, dtypes: dict[str, str], saves: BlobStore, folder: str,
                 shard_bytes: int = 5 * 10**9) -> str:
    """Write θ in Hugging Face format to `folder` of the saves store; returns where it lies: the weights in
    their original dtypes, as model.safetensors or, over `shard_bytes`, as shards with a
    model.safetensors.index.json (no weight file of an earlier export is left beside them), then the
    config and tokenizer. Refuses (InsufficientStorage, bytes named) before its first write when the
    saves store has no room for it."""
    with files.read(theta) as weights:
        infos = [TensorInfo(i.name, dtypes.get(i.name, "F32"), i.shape) for i in weights.infos]
        public = sum(files.size(files.public(name)) for name in files.public_names())
        saves.check_space(sum(i.nbytes for i in infos) + public, f"saving the merged model to {folder}")
        plan = shard_plan(infos, shard_bytes)
        names = ["model.safetensors"] if len(plan) == 1 else \
            [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        for name, shard in zip(names, plan):
            tensors = (weights.read(i.name).to(DTYPES[i.dtype]) for i in shard)
            saves.write_safetensors(f"{folder}/{name}", shard, tensors, {"format": "pt"}, private=False)
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in infos)},
                 "weight_map": {i.name: name for name, shard in zip(names, plan) for i in shard}}
        saves.write_bytes(f"{folder}/{WEIGHT_INDEX}", json.dumps(index, indent=2).encode(), private=False)
    for stale in saves.list(folder):
        if stale.startswith("model") and ".safetensors" in stale and stale not in names and \
                not (len(plan) > 1 and stale == WEIGHT_INDEX):
            saves.delete(f"{folder}/{stale}")
    for name in files.public_names():
        with saves.create(f"{folder}/{name}", private=False) as writer:
            for chunk in files.chunks(files.public(name)):
                writer.file.write(chunk)
    where = saves.describe(folder)
    log.info("saved merged model to %s", where)
    return where
