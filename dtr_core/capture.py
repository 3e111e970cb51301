"""Capture the teacher's per-layer attention inputs and outputs into sharded safetensors.

Layout under ``out_dir``::

    layer_000/shard_00000.safetensors   inputs [N, T, hidden], outputs [N, T, out], attention_mask [N, T]
    ...
    manifest.json                       written last: its presence means the capture is complete

Every layer's shards hold the same sequences, so one layer can be distilled from its own folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter
from .batching import pad_rows
from .io import load_tensors, read_json, save_tensors, write_json
from .specs import CaptureSpec, spec_digest

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the capture folder
    sha256: str
    sequences: int
    tokens: int


@dataclass(frozen=True)
class CaptureManifest:
    directory: str
    num_layers: int
    hidden_size: int
    output_size: int
    sequence_length: int
    dtype: str
    sequences: int
    tokens: int
    spec_digest: str
    model_fingerprint: str
    seconds: float
    shards: dict[int, list[ShardInfo]]

    def to_json(self) -> dict:
        data = asdict(self)
        data["shards"] = {str(k): [asdict(s) for s in v] for k, v in self.shards.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> CaptureManifest:
        shards = {int(k): [ShardInfo(**s) for s in v] for k, v in data["shards"].items()}
        return cls(**{**data, "shards": shards})

    @classmethod
    def load(cls, directory: str | Path) -> CaptureManifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the capture in {directory} did not finish; rerun it")
        return cls.from_json(read_json(path))


@dataclass(frozen=True)
class MixedTexts:
    """The distillation text: documents of two sources interleaved, and each source's token count."""

    texts: list[str]
    task_tokens: int
    general_tokens: int

    def describe(self, general_name: str) -> str:
        total = max(self.task_tokens + self.general_tokens, 1)
        return (f"{self.task_tokens:,} tokens of the run's text + {self.general_tokens:,} of {general_name} "
                f"({self.general_tokens / total:.0%} general)")


def mix_texts(task: Sequence[str], general: Sequence[str], share: float, budget: int,
              count_tokens: Callable[[str], int]) -> MixedTexts:
    """The run's text with general text making up ``share`` of the tokens, within ``budget``.

    The run's documents are taken in order up to (1 - share) × budget tokens, then general documents
    until they make up ``share`` of what was taken (fewer when there is not that much general text),
    and the two are interleaved so that every stretch of the result, the held-out start included,
    holds about the same mix. ``count_tokens`` counts a document's tokens (the teacher's tokenizer).
    """
    def take(texts: Sequence[str], limit: float) -> list[tuple[str, int]]:
        taken, tokens = [], 0
        for text in texts:
            if tokens >= limit:
                break
            count = count_tokens(text)
            taken.append((text, count))
            tokens += count
        return taken

    own = take(task, (1.0 - share) * budget)
    own_tokens = sum(count for _, count in own)
    extra = take(general, own_tokens * share / (1.0 - share))
    mixed, counts = [], {"own": 0, "extra": 0}
    queues = {"own": iter(own), "extra": iter(extra)}
    pending = {"own": len(own), "extra": len(extra)}
    while pending["own"] or pending["extra"]:
        total = counts["own"] + counts["extra"]
        # Take from the general queue while it is behind its share (or the other queue is empty).
        behind = counts["extra"] < share * max(total, 1)
        source = "extra" if pending["extra"] and (behind or not pending["own"]) else "own"
        text, count = next(queues[source])
        mixed.append(text)
        counts[source] += count
        pending[source] -= 1
    return MixedTexts(mixed, counts["own"], counts["extra"])


def tokenize_for_capture(tokenizer, texts: Iterable[str], spec: CaptureSpec, pack: bool) -> Iterator[dict]:
    """Batches of ``input_ids``/``attention_mask`` [B, max_length] holding about ``token_budget`` real tokens.

    ``pack=True`` (decoders) concatenates documents separated by EOS into full blocks, so no
    position is padding; ``pack=False`` (encoders) truncates each document and pads it, as the
    encoder sees documents at inference time.
    """
    remaining = spec.token_budget
    rows: list[list[int]] = []
    carry: list[int] = []

    def flush(batch_rows: list[list[int]]) -> dict:
        ids, mask = pad_rows(batch_rows, tokenizer.pad_token_id, width=spec.max_length)
        return {"input_ids": ids, "attention_mask": mask}

    for text in texts:
        if pack:
            carry.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            while len(carry) >= spec.max_length and remaining > 0:
                rows.append(carry[: spec.max_length])
                carry = carry[spec.max_length:]
                remaining -= spec.max_length
        else:
            row = tokenizer(text, truncation=True, max_length=spec.max_length)["input_ids"]
            rows.append(row[:remaining] if len(row) > remaining else row)
            remaining -= len(rows[-1])
        while len(rows) >= spec.batch_size:
            yield flush(rows[: spec.batch_size])
            rows = rows[spec.batch_size:]
        if remaining <= 0:
            break
    if pack and remaining > 0 and len(carry) > 1:
        rows.append(carry[: min(remaining, spec.max_length)])
    if rows:
        yield flush(rows)


class AttentionRecorder:
    """Forward hooks that keep each attention module's input and output for the current batch.

    ``device``/``dtype`` None keep the tensors where and as the teacher computed them (streaming
    trains on them in place, with no copy to the host).
    """

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        self.inputs: list[torch.Tensor | None] = [None] * len(modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [
            module.register_forward_hook(self._hook(i), with_kwargs=True) for i, module in enumerate(modules)
        ]
        self.dtype, self.device = dtype, device

    def _hook(self, index: int):
        def record(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[index] = hidden.detach().to(device=self.device, dtype=self.dtype)
            self.outputs[index] = output[0].detach().to(device=self.device, dtype=self.dtype)
        return record

    def clear(self) -> None:
        """Drop the last batch's tensors (so they do not coexist with the next batch's)."""
        self.inputs = [None] * len(self.inputs)
        self.outputs = [None] * len(self.outputs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def capture_teacher(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: Iterable[dict],
    spec: CaptureSpec,
    out_dir: str | Path,
    model_fingerprint: str,
    device: str | torch.device = "cpu",
) -> CaptureManifest:
    """Run the teacher once over ``batches`` and store every layer's attention input/output.

    Returns the manifest (also written to ``out_dir/manifest.json``, last, atomically).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # an old manifest must not vouch for new shards
    num_layers = adapter.num_layers
    dtype = getattr(torch, spec.dtype)
    recorder = AttentionRecorder([adapter.attention_module(model, i) for i in range(num_layers)], dtype, "cpu")
    shards: dict[int, list[ShardInfo]] = {i: [] for i in range(num_layers)}
    pending: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = []
    pending_tokens = total_tokens = total_sequences = 0
    hidden_size = output_size = length = 0

    def write_shard() -> None:
        nonlocal pending, pending_tokens
        index = len(shards[0])
        mask = torch.cat([p[2] for p in pending]).to(torch.uint8)
        for layer_idx in range(num_layers):
            name = f"layer_{layer_idx:03d}/shard_{index:05d}.safetensors"
            digest = save_tensors(out_dir / name, {
                "inputs": torch.cat([p[0][layer_idx] for p in pending]),
                "outputs": torch.cat([p[1][layer_idx] for p in pending]),
                "attention_mask": mask,
            })
            shards[layer_idx].append(ShardInfo(name, digest, mask.shape[0], int(mask.sum())))
        pending, pending_tokens = [], 0

    try:
        for batch in batches:
            mask = batch["attention_mask"]
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device))
            pending.append((list(recorder.inputs), list(recorder.outputs), mask.cpu()))
            tokens = int(mask.sum())
            pending_tokens += tokens
            total_tokens += tokens
            total_sequences += mask.shape[0]
            length = max(length, mask.shape[1])
            hidden_size, output_size = recorder.inputs[0].shape[-1], recorder.outputs[0].shape[-1]
            if pending_tokens >= spec.shard_tokens:
                write_shard()
        if pending:
            write_shard()
    finally:
        recorder.remove()
    if total_tokens == 0:
        raise ValueError("capture saw no tokens: the capture text is empty")

    manifest = CaptureManifest(
        directory=str(out_dir), num_layers=num_layers, hidden_size=hidden_size, output_size=output_size,
        sequence_length=length, dtype=spec.dtype, sequences=total_sequences, tokens=total_tokens,
        spec_digest=spec_digest(spec), model_fingerprint=model_fingerprint,
        seconds=time.perf_counter() - started, shards=shards,
    )
    write_json(out_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


@dataclass
class LayerActivations:
    """One layer's captured data, concatenated over shards."""

    inputs: torch.Tensor  # [N, T, hidden]
    outputs: torch.Tensor  # [N, T, out]
    attention_mask: torch.Tensor  # [N, T] bool


def load_layer_activations(manifest: CaptureManifest, layer_idx: int) -> LayerActivations:
    """Read and verify (sha256) every shard of one layer."""
    if layer_idx not in manifest.shards:
        raise IndexError(f"layer_idx={layer_idx} is not in the capture (layers 0..{manifest.num_layers - 1})")
    parts = [load_tensors(Path(manifest.directory) / s.file, s.sha256) for s in manifest.shards[layer_idx]]
    return LayerActivations(
        inputs=torch.cat([p["inputs"] for p in parts]),
        outputs=torch.cat([p["outputs"] for p in parts]),
        attention_mask=torch.cat([p["attention_mask"] for p in parts]).bool(),
    )
