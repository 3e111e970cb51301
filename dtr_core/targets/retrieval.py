"""Retrieval (encoders): does the hybrid's embedding still find the right document?

Each example is a query and the document it should find: a text's first line and the lines after
it (``data.query_and_document``; a BBC News article is its headline, then its body). Queries and
documents are embedded like sentence-transformers embed with MiniLM (mean of the last hidden state
over real tokens, L2-normalised), and every query ranks every document of its split by cosine
similarity. The score is recall@1: the share of queries whose own document ranks first. Higher is
better; each query is one example of the bootstrap acceptance rule (``acceptance.py``; the
documents stay fixed, the queries are resampled).

Unlike the frozen topic probe, which five well-separated classes keep at the full model's accuracy
with every layer replaced, a query has one right answer among hundreds of documents on the same
five topics: small shifts of the embeddings reorder near neighbours, so replacing layers costs a
measurable score (MiniLM, 300 BBC headlines: recall@1 0.89 with full attention, 0.82 with all six
layers linear; BENCHMARKS.md, the default demo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..acceptance import ExampleScores
from ..direction import Direction
from ..specs import TargetSpec
from .data import TextSplit, query_and_document
from .tasks import mean_pooled, tokenize_split

# Marks a batch of queries (True) or of documents (False): they are embedded in separate batches
# so that the short queries are not padded to the documents' length.
QUERY_KEY = "is_query"


@dataclass(frozen=True)
class RetrievalPairs:
    """One split's queries and their documents, aligned: ``documents[i]`` is what ``queries[i]`` should find."""

    queries: tuple[str, ...]
    documents: tuple[str, ...]


def retrieval_pairs(split: TextSplit) -> RetrievalPairs:
    """Each text's query and document (``load_task_data`` checked that every text has both). A
    document seen before in the split is left out with its query: two equal documents would make
    the right answer ambiguous (BBC News holds a few articles twice)."""
    queries, documents, seen = [], [], set()
    for text in split.texts:
        query, document = query_and_document(text)
        if document not in seen:
            seen.add(document)
            queries.append(query)
            documents.append(document)
    return RetrievalPairs(tuple(queries), tuple(documents))


def tokenize_retrieval(tokenizer, pairs: RetrievalPairs, spec: TargetSpec) -> list[dict[str, torch.Tensor]]:
    """Batches of queries, then batches of documents (``spec.max_length`` tokens each), in order."""
    batches = []
    for is_query, texts in ((True, pairs.queries), (False, pairs.documents)):
        for batch in tokenize_split(tokenizer, TextSplit(texts, None), spec):
            batch[QUERY_KEY] = torch.tensor(is_query)
            batches.append(batch)
    return batches


class Retrieval:
    """Recall@1 of every query against every document of the split, by cosine similarity."""

    direction = Direction.HIGHER
    metric_name = "recall@1"

    def collect(self, output: Any, batch: Mapping[str, torch.Tensor]) -> tuple[bool, np.ndarray]:
        """Whether the batch holds queries, and its embeddings [B, hidden]."""
        return bool(batch[QUERY_KEY]), mean_pooled(output, batch["attention_mask"]).cpu().numpy()

    def hits(self, collected: Sequence[tuple[bool, np.ndarray]]) -> np.ndarray:
        """Per query, 1.0 when its own document is the most similar one, else 0.0: [queries]."""
        queries = np.concatenate([embeddings for is_query, embeddings in collected if is_query])
        documents = np.concatenate([embeddings for is_query, embeddings in collected if not is_query])
        similarity = queries @ documents.T  # [queries, documents]; the embeddings are unit vectors
        own = np.diagonal(similarity)
        # A tie with another document counts as a miss: the query did not single its own out.
        return ((similarity >= own[:, None]).sum(1) == 1).astype(np.float64)

    def score(self, collected: Sequence[tuple[bool, np.ndarray]]) -> float:
        return float(self.hits(collected).mean())

    def examples(self, collected: Sequence[tuple[bool, np.ndarray]]) -> ExampleScores:
        hits = self.hits(collected)
        return ExampleScores(hits, np.ones_like(hits))
