"""The TOFU splits one evaluation reads, checked and fingerprinted (DESIGN.md §7).

    forget{01,05,10}  ↔  retain{99,95,90}  ↔  holdout{01,05,10}

Forget metrics read `forget{NN}_perturbed` (its question/answer pairs are those of `forget{NN}`),
membership inference reads `holdout{NN}`, utility reads `retain_perturbed`, plus
`real_authors_perturbed` and `world_facts_perturbed` when present (their answer plus
`perturbed_answer` are exactly option1..4 of `real_authors.json` / `world_facts.json`). The first
three are required; a missing utility split is reported in `missing`, never an error.

A split is read from what users of the `locuslab/TOFU` dataset have (`splits.py`): `{split}.json`
JSON lines (the dataset repository's own files, e.g. a snapshot in the Hugging Face cache), or the
`datasets` library's saves: a `{split}/` folder written by `save_to_disk` (a Dataset, or a
DatasetDict with its `train` split), or Parquet files (`{split}.parquet`, `{split}/*.parquet`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pum.common.splits import find_split, read_split

SPLITS = {"forget01": ("retain99", "holdout01"), "forget05": ("retain95", "holdout05"),
          "forget10": ("retain90", "holdout10")}
# role -> (file stem, key of the reference answer â of the truth ratio)
PERTURBED_ROLES = {
    "forget": (None, "paraphrased_answer"),  # stem depends on the forget split
    "retain": ("retain_perturbed", "paraphrased_answer"),
    "real_authors": ("real_authors_perturbed", "answer"),
    "world_facts": ("world_facts_perturbed", "answer"),
}
OPTIONAL_ROLES = ("real_authors", "world_facts")


@dataclass(frozen=True)
class TofuData:
    """Validated records per role: forget, holdout, retain, and real_authors / world_facts if present."""

    data_dir: Path
    forget_split: str
    records: dict[str, list[dict]]
    files: dict[str, str]  # role -> file name
    digests: dict[str, str]  # role -> sha256 of the file's bytes
    missing: list[str] = field(default_factory=list)  # optional roles without a file
    max_items: int | None = None

    @property
    def retain_split(self) -> str:
        return SPLITS[self.forget_split][0]

    @property
    def holdout_split(self) -> str:
        return SPLITS[self.forget_split][1]


def _check(path: Path, records: list[dict], reference_key: str | None) -> None:
    """Refuse records the metrics cannot use, naming the file, the record and the field."""
    if not records:
        raise ValueError(f"{path}: no records")
    for number, record in enumerate(records, start=1):
        keys = ["question", "answer"] + ([reference_key] if reference_key else [])
        for key in keys:
            if not isinstance(record.get(key), str):
                raise ValueError(f"{path}: record {number} needs a string field {key!r}")
        if reference_key is not None:
            perturbed = record.get("perturbed_answer")
            if not isinstance(perturbed, list) or not perturbed or not all(isinstance(a, str) for a in perturbed):
                raise ValueError(f"{path}: record {number} needs 'perturbed_answer', a non-empty list of strings")


def load_tofu(data_dir: str | Path, forget_split: str = "forget10", max_items: int | None = None) -> TofuData:
    """The splits for `forget_split`; `max_items` keeps the first N records of each (smoke runs only)."""
    if forget_split not in SPLITS:
        raise ValueError(f"unknown forget split {forget_split!r}; known: {', '.join(SPLITS)}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be ≥ 1 or None for every record (got {max_items})")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no data folder {data_dir}")
    stems = {"forget": f"{forget_split}_perturbed", "holdout": SPLITS[forget_split][1]}
    stems.update({role: stem for role, (stem, _) in PERTURBED_ROLES.items() if stem})
    records, files, digests, missing = {}, {}, {}, []
    for role, stem in stems.items():
        path = find_split(data_dir, stem)
        if path is None:
            if role in OPTIONAL_ROLES:
                missing.append(role)
                continue
            raise FileNotFoundError(f"{data_dir} has no {stem}.json (nor a saved {stem}/ dataset), "
                                    f"needed for the {role} metrics")
        rows, digests[role] = read_split(path)
        rows = rows[:max_items]
        _check(path, rows, PERTURBED_ROLES[role][1] if role in PERTURBED_ROLES else None)
        records[role], files[role] = rows, path.name
    return TofuData(data_dir, forget_split, records, files, digests, missing, max_items)


def resolve_data(name: str | Path) -> Path:
    """A TOFU folder: `name` itself, or the cached snapshot of a dataset id such as `locuslab/TOFU`."""
    from pum.common.hub import resolve_local

    path = Path(name).expanduser()
    return path if path.is_dir() else resolve_local(str(name), "--data", repo_type="dataset")
