"""Example targets built from the built-in BBC News corpus, for runs beyond the topic label:

    python tools/example_targets.py OUT_DIR

writes
- ``OUT_DIR/headlines.jsonl``: free-form answers. Each article's first line is its headline; the
  record is ``{"text": <the article without it>, "headline": <the headline>}``. A target:
  ``--dataset OUT_DIR/headlines.jsonl --target-kind token_f1 --target
  'label_field=headline,prompt_template=Article: {text}\\nHeadline:,num_fewshot=1'``.
- ``OUT_DIR/lm_eval/``: an lm-evaluation-harness task ``bbc_topic`` (local YAML over a local jsonl:
  which of the five topics an article is about, scored by log-likelihood, ``acc``). A target:
  ``--target-kind lm_eval --target 'lm_eval_task=bbc_topic,lm_eval_include_path=OUT_DIR/lm_eval'``.

Articles are taken in a fixed order (every ``--stride``-th of the sorted corpus), so the files are
the same on every machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dtr_core.specs import TargetSpec
from dtr_core.targets.data import load_task_data

LM_EVAL_TASK = """\
task: bbc_topic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Article: {{{{article}}}}\\nTopic:"
doc_to_choice: {choices}
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def first_words(text: str, count: int) -> str:
    return " ".join(text.split()[:count])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--stride", type=int, default=4, help="take every n-th article (default 4: 557 articles)")
    parser.add_argument("--article-words", type=int, default=120, help="words kept of each article")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    data = load_task_data(TargetSpec(dataset="bbc_news", kind="classification"))
    articles = [(text, label) for split in (data.train, data.validation, data.test)
                for text, label in zip(split.texts, split.labels)]
    articles.sort()  # independent of how the splits were drawn
    chosen = articles[::args.stride]

    headlines = []
    for text, _ in chosen:
        title, _, body = text.strip().partition("\n")
        if title.strip() and body.strip():
            headlines.append({"text": first_words(body, args.article_words), "headline": title.strip()})
    write_jsonl(args.out_dir / "headlines.jsonl", headlines)

    task_dir = args.out_dir / "lm_eval"
    task_dir.mkdir(exist_ok=True)
    docs = [{"article": first_words(text, args.article_words), "answer": label} for text, label in chosen]
    write_jsonl(task_dir / "bbc_topic.jsonl", docs)
    (task_dir / "bbc_topic.yaml").write_text(LM_EVAL_TASK.format(
        data=(task_dir / "bbc_topic.jsonl").resolve(), cache=(task_dir / "datasets_cache").resolve(),
        choices=json.dumps(list(data.label_names))))
    print(f"{len(headlines)} headlines → {args.out_dir / 'headlines.jsonl'}; "
          f"{len(docs)} documents of lm-eval task bbc_topic → {task_dir}")


if __name__ == "__main__":
    main()
