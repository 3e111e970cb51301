"""DtR hybrid models: linear-attention students in the layers listed in ``config.dtr_hybrid["students"]``,
the base model's own attention everywhere else.

Export copies this file next to the model with its siblings and appends the class that the exported
config's ``auto_map`` names: one of the mixins below before the base architecture's transformers
class, e.g. ``class DtrHybridLlamaForCausalLM(DtrHybridGenerationMixin, transformers.LlamaForCausalLM)``.

Needs only torch and transformers (fla, if installed, speeds the students up on CUDA); load with
``from_pretrained(folder, trust_remote_code=True)``.
"""

import copy
import importlib.util
import logging

import torch
import transformers  # noqa: F401  (the class export appends subclasses transformers.<base class>)
from transformers.cache_utils import DynamicCache

from .cache import attends_globally, preallocated_cache
from .decoding import cache_keyword, sample_static, static_generate, static_sampling_refusal
from .students import build_student

logger = logging.getLogger(__name__)


def _base_view(config):
    """The config as the base architecture expects it: its own ``layer_types`` (or none)."""
    base = copy.deepcopy(config)
    original = config.dtr_hybrid.get("base_layer_types")
    if original is None:
        if "layer_types" in base.__dict__:
            del base.layer_types
    else:
        base.layer_types = original
    return base


def _preferred_attention(dtype):
    """flash-attn 2 for the full-attention layers where it can run: installed, CUDA present and 16-bit
    weights requested; None leaves transformers' default (SDPA)."""
    half = (torch.float16, torch.bfloat16, "float16", "bfloat16")
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available() or dtype not in half:
        return None
    return "flash_attention_2"


def _generation_cache(config, default_generation_config, args, kwargs):
    """The cache generate() starts from: preallocated for prompt + new tokens where every full-attention
    layer is global (a sliding window keeps transformers' own layers)."""
    if not attends_globally(config):
        return DynamicCache()
    generation_config = kwargs.get("generation_config") or default_generation_config
    prompt = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
    new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if prompt is not None and new_tokens is not None:
        capacity = prompt.shape[-1] + new_tokens
    else:  # the total length, or unknown (0: the buffers grow as needed)
        capacity = kwargs.get("max_length", generation_config.max_length) or 0
    return preallocated_cache(config.num_hidden_layers, capacity)


class DtrHybridMixin:
    """Put before a transformers model class: builds the base architecture, then installs the students."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # The students run on fla on CUDA; the full-attention layers get flash-attn when it is usable. An
        # explicit attn_implementation wins; config._attn_implementation records what was chosen.
        if "attn_implementation" not in kwargs:
            preferred = _preferred_attention(kwargs.get("dtype", kwargs.get("torch_dtype")))
            if preferred is not None:
                kwargs["attn_implementation"] = preferred
        return super().from_pretrained(*args, **kwargs)

    def __init__(self, config):
        # The base architecture is built from its own view of the config (Qwen2, for one, reads
        # layer_types to pick attention masks); the hybrid's config stays the model's public one.
        base = _base_view(config)
        super().__init__(base)
        # transformers resolved the attention implementation on the config the model was built
        # with; the public config must agree, since the top-level forward reads it for masks.
        config._attn_implementation = base._attn_implementation
        self.config = config
        for entry in config.dtr_hybrid["students"]:
            parent_path, _, name = entry["module_path"].rpartition(".")
            parent = self.get_submodule(parent_path) if parent_path else self
            student = build_student(entry["student_config"])
            student.layer_idx = entry["layer_idx"]
            setattr(parent, name, student)


class DtrHybridGenerationMixin(DtrHybridMixin):
    """DtrHybridMixin for base classes that generate: generate() on a cache the students can use, its greedy
    and sampling loop on static, graph-replayed steps by default, and generate_static()."""

    def __init__(self, config):
        super().__init__(config)
        self._static_decoding = True  # generate(static_decoding=...) for the call under way
        self._explained_fallbacks: set[str] = set()

    def generate(self, *args, static_decoding: bool = True, **kwargs):
        """transformers' generate(). Greedy decoding and sampling (any logits processors and stopping
        criteria, left-padded batches, streamers, scores and logits in a returned dict) run every step after
        the prompt as one replayed CUDA graph on CUDA (decoding.sample_static: the same tokens as
        transformers' loop). Everything else (beam search, assisted decoding, sliding-window models, a cache
        passed in, attentions or hidden states asked for, ...), and ``static_decoding=False``, takes
        transformers' own loop; the first time a reason comes up a warning says which."""
        # transformers would build the cache from config.layer_types and then fail to find a
        # sequence length when every layer is linear; our own cache lets each student put its
        # recurrent-state layer in (cache.RecurrentStateLayer), and the full-attention layers
        # write into buffers sized for the prompt + new tokens instead of re-concatenating their
        # keys and values at every step (cache.PreallocatedLayer).
        cache_arg = cache_keyword(self)
        if kwargs.get(cache_arg) is None and kwargs.get("use_cache", True):
            kwargs[cache_arg] = _generation_cache(self.config, self.generation_config, args, kwargs)
        self._static_decoding = static_decoding
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._static_decoding = True

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        # generate() dispatches greedy decoding and sampling here, every argument prepared.
        if self._static_decoding:
            refusal = static_sampling_refusal(self, generation_config, model_kwargs, synced_gpus)
            if refusal is None:
                return sample_static(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                     model_kwargs, streamer)
            self._explain_fallback(refusal)
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def _beam_search(self, *args, **kwargs):
        self._explain_fallback("beam search")
        return super()._beam_search(*args, **kwargs)

    def _assisted_decoding(self, *args, **kwargs):
        self._explain_fallback("assisted decoding")
        return super()._assisted_decoding(*args, **kwargs)

    def _explain_fallback(self, reason: str) -> None:
        """Say once per model and reason that generate() decodes eagerly, step by step, and why."""
        if self._static_decoding and reason not in self._explained_fallbacks:
            self._explained_fallbacks.add(reason)
            logger.warning("%s.generate() decodes with transformers' step-by-step loop, not static graph-replayed "
                           "steps, because of %s (said once per model and reason)", type(self).__name__, reason)

    def generate_static(self, input_ids, max_new_tokens, attention_mask=None, **kwargs):
        """The leanest static loop (decoding.static_generate, whose every decoding step, on CUDA, replays one
        captured CUDA graph): greedy or plain sampling for prompts left-padded by ``attention_mask``, with the
        options do_sample, temperature, eos_token_id, pad_token_id (the last two default to the generation
        config's). Returns prompts + new tokens."""
        for name in ("eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, getattr(self.generation_config, name, None))
        return static_generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, **kwargs)
