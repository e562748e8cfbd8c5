"""One split of a QA dataset (TOFU's `forget10`, …) in the layouts its users have on disk.

- `{split}.json` / `{split}.jsonl`: JSON lines (or one JSON array), the files of the `locuslab/TOFU`
  dataset repository, so a snapshot of it in the Hugging Face cache is such a folder;
- `{split}/`: a folder written by the `datasets` library's `save_to_disk`, of a Dataset
  (`state.json` + `data-*.arrow`) or of a DatasetDict (its `train` split, `dataset_dict.json`);
- `{split}.parquet`, or `{split}/` holding Parquet files (the Hub's Parquet conversion).

JSON needs nothing more; Arrow and Parquet need `pyarrow` (the optional extra `datasets`), imported
only when such a split is read. `read_split` returns the records and a sha256 of the bytes read,
the fingerprint evaluation caches key on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

JSON_SUFFIXES = (".json", ".jsonl")
PYARROW_HINT = "pip install 'pum-unlearn[datasets]' (pyarrow)"


def find_split(folder: Path, split: str) -> Path | None:
    """The file or folder holding `split` in `folder`, in the order above; None when there is none."""
    for name in (f"{split}.json", f"{split}.jsonl", f"{split}.parquet", split):
        path = folder / name
        if path.is_file() or (path.is_dir() and _data_files(path)):
            return path
    return None


def read_split(path: str | Path) -> tuple[list[dict], str]:
    """(records, sha256 of the data bytes) of a split file or folder (see the module docstring)."""
    from pum.common.qa import load_records

    path = Path(path)
    files = [path] if path.is_file() else _data_files(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no split: JSON lines, a save_to_disk folder or Parquet files")
    digest = hashlib.sha256()
    records: list[dict] = []
    for file in files:
        digest.update(file.read_bytes())
        records.extend(load_records(file) if file.suffix in JSON_SUFFIXES else _read_arrow(file))
    return records, digest.hexdigest()


def _data_files(folder: Path) -> list[Path]:
    """The data files of a saved split, in their order (state.json's list for save_to_disk)."""
    if (folder / "dataset_dict.json").is_file():
        return _data_files(folder / "train") if (folder / "train").is_dir() else []
    state = folder / "state.json"
    if state.is_file():
        names = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
        return [folder / name for name in names]
    parquet = sorted(folder.glob("*.parquet")) or sorted(folder.glob("train/*.parquet"))
    return parquet


def _read_arrow(file: Path) -> list[dict]:
    try:
        import pyarrow.ipc as ipc
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {file} needs pyarrow: {PYARROW_HINT}") from None
    if file.suffix == ".parquet":
        return pq.read_table(file).to_pylist()
    with file.open("rb") as handle:  # save_to_disk writes the Arrow IPC stream format
        return ipc.open_stream(handle).read_all().to_pylist()
