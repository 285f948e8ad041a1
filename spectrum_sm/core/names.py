"""How a checkpoint's stored tensors are named in the model that transformers loads from it.

transformers 5 renames and fuses checkpoint keys while loading: a VLM's stored
``model.layers.0...`` becomes ``model.language_model.layers.0...``, GPT-NeoX's ``embed_out`` becomes
``lm_head``, Mixtral's ``block_sparse_moe.experts.3.w1`` becomes rows of the fused 3-D parameter
``mlp.experts.gate_up_proj``. Layer files must name what the *loaded* model has (that is what
``train.py`` and axolotl match), so every stored weight gets a :class:`Target`: the loaded
parameter, and for a fused expert the slice of it.

With transformers installed the map comes from transformers itself: the model is built on the
meta device (no memory) and each stored key goes through the model's own conversion mapping.
Without it (the analysis's CPU image), stored names are kept and ``train.py`` translates them when
it loads the model. Either way, :func:`tower_of` tells which tower of a multimodal model a weight
belongs to.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import mxfp4
from .errors import SpectrumError, unknown_model

log = logging.getLogger(__name__)

#: The towers of a multimodal model; ``language`` is the text model and its head.
TOWERS = ("language", "vision", "audio", "projector")
#: Words in a name's components that place it in a tower, checked in this order.
_TOWER_WORDS = {
    "projector": ("projector", "merger", "connector", "aligner"),
    "vision": ("visual", "vision", "image_encoder", "vit", "vpm", "siglip"),
    "audio": ("audio", "speech", "whisper"),
}
_INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
_OUTPUT_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
#: A fused expert parameter's bias is the parameter's name and this (gpt-oss: ``gate_up_proj``
#: and ``gate_up_proj_bias``, both ``[experts, ...]``).
EXPERT_BIAS_SUFFIX = "_bias"
#: The conversions (by operation) that fuse stored per-expert weights: ``MergeModulelist(dim=0)``
#: stacks experts on dimension 0, then ``Concatenate(dim=1)`` puts the sources (gate, up) side by
#: side on dimension 1. Other conversions are not mapped.
FUSING_OPERATIONS = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


@dataclass(frozen=True)
class Target:
    """Where a stored weight lives in the loaded model.

    ``index`` is empty for a whole parameter; for a fused expert it is ``(expert,)`` (a whole
    row of dimension 0) or ``(expert, start, stop)`` (rows ``start:stop`` of dimension 1 in it).
    ``with_bias``: the expert's row of the parameter's bias (``param`` + ``_bias``) trains too.
    """

    param: str
    index: tuple[int, ...] = ()
    with_bias: bool = False

    @property
    def module(self) -> str:
        return self.param.removesuffix(".weight")

    def entry(self) -> str:
        """The layer-file entry: the module name, or the anchored parameter and its slice
        (axolotl's ``name$[e]`` syntax; ``[e, a:b]`` is ours, for half of a fused gate_up)."""
        if not self.index:
            return self.module
        if len(self.index) == 1:
            # One entry for weight and bias: a module entry trains both, and so does this one
            # (the group is a plain regular expression to freeze_except and axolotl alike).
            bias = f"({EXPERT_BIAS_SUFFIX})?" if self.with_bias else ""
            return f"^{self.param}{bias}$[{self.index[0]}]"
        expert, start, stop = self.index
        return f"^{self.param}$[{expert}, {start}:{stop}]"


@dataclass
class ModelNames:
    """Stored tensor name -> :class:`Target`, and which weights are the embeddings."""

    targets: dict[str, Target]
    input_embedding: str | None
    output_head: str | None
    tied: bool
    multimodal: bool
    source: str
    notes: list[str] = field(default_factory=list)

    def target(self, stored: str) -> Target:
        return self.targets.get(stored) or Target(stored)

    def module(self, stored: str) -> str:
        """The module name used in results: the loaded module, or for a fused expert slice the
        fused module, the expert index and the stored leaf (``...mlp.experts.3.gate_proj``), the
        name the reference gave it when experts were separate modules."""
        target = self.target(stored)
        if not target.index:
            return target.module
        fused_module = target.param.rsplit(".", 1)[0]
        leaf = stored.removesuffix(".weight").rsplit(".", 1)[-1]
        return f"{fused_module}.{target.index[0]}.{leaf}"

    def expert(self, stored: str, expert: int, with_bias: bool) -> tuple[str, Target]:
        """The module name and target of expert ``expert`` of a fused 3-D expert tensor stored
        as is (gpt-oss's ``mlp.experts.gate_up_proj``, or its MXFP4 ``_blocks``): named
        ``...mlp.experts.3.gate_up_proj``, as per-expert modules of other MoE families are, so
        its type is per expert; the target is the expert's row of the loaded parameter."""
        param = self.target(stored).param
        fused_module, leaf = param.rsplit(".", 1)
        return f"{fused_module}.{expert}.{leaf}", Target(param, (expert,), with_bias)

    def tower(self, stored: str) -> str:
        return tower_of(self.target(stored).param) if self.multimodal else "language"

    def embedding_entries(self) -> list[str]:
        """The reference writes ``^lm_head.weight$`` then ``^model.embed_tokens.weight$``; these
        are the same for the model at hand (output head first, then input embedding)."""
        names = [n for n in (self.output_head, self.input_embedding) if n]
        return [f"^{n}$" for n in dict.fromkeys(names)]


def is_multimodal(config: Mapping[str, Any] | None) -> bool:
    config = config or {}
    return any(k in config for k in ("vision_config", "audio_config", "vision_tower_config"))


def tower_of(name: str) -> str:
    """``language``, ``vision``, ``audio`` or ``projector``, from a (stored or loaded) name."""
    parts = name.lower().split(".")
    for tower, words in _TOWER_WORDS.items():
        if any(word in part for part in parts for word in words):
            return tower
    return "language"


def model_class_for(config: Mapping[str, Any] | Any):
    """The auto class that loads this model for text training: ``AutoModelForCausalLM``, or
    ``AutoModelForImageTextToText`` for vision-language models (which the former refuses)."""
    import transformers

    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    if get("vision_config") is not None or get("audio_config") is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def meta_model(config: Mapping[str, Any], where: str = "model"):
    """The model built from ``config`` on the meta device (no memory), with the class
    :func:`model_class_for` picks; ``where`` names the command in a refusal."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise SpectrumError("config.json has no model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except Exception as exc:
        raise unknown_model(where, dict(config), exc, can_trust=False) from exc
    cls = model_class_for(cfg)
    with torch.device("meta"):
        try:
            return cls.from_config(cfg)
        except ValueError:
            if cls.__name__ == "AutoModelForCausalLM":
                raise
            return AutoModelForCausalLM.from_config(cfg)


class _Converter:
    """transformers' own renaming of checkpoint keys for one model, and its fused experts."""

    def __init__(self, model) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._rename = rename_source_key
        self._prefix = getattr(model, "base_model_prefix", None)
        self.params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        self._state = dict.fromkeys(model.state_dict())

    def resolve(self, stored: str, shapes: Mapping[str, tuple[int, ...]]) -> Target | None:
        """The target of ``stored``; ``shapes`` holds the stored shapes (for fused offsets)."""
        base = mxfp4.base_name(stored)
        if base is not None and stored not in self._state:
            # MXFP4 blocks and scales load into the parameter they are named after.
            return self.resolve(base, shapes)
        key, pattern = self._rename(
            stored, self._renamings, self._converters, self._prefix, self._state
        )
        if pattern is None:
            return Target(key) if key in self.params else None
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        return self._fused(stored, key, pattern, converter, shapes)

    def _fused(self, stored, param, pattern, converter, shapes) -> Target | None:
        """A stored expert weight merged into a 3-D parameter (:data:`FUSING_OPERATIONS`)."""
        ops = [type(op).__name__ for op in converter.operations]
        if param not in self.params or ops not in FUSING_OPERATIONS:
            return None
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), stored)
        if match is None:
            return None
        expert = int(match.group(1))
        if ops == ["MergeModulelist"]:
            return Target(param, (expert,))
        sources = list(converter.source_patterns)
        position = sources.index(pattern)
        prefix, suffix = stored[: match.start()], stored[match.end() :]
        siblings = [prefix + s.replace("*", str(expert)) + suffix for s in sources]
        if all(s in shapes for s in siblings):
            start = sum(shapes[s][0] for s in siblings[:position])
            return Target(param, (expert, start, start + shapes[stored][0]))
        # Stored shapes unknown (a layer file read at training time): equal parts.
        width = self.params[param][1]
        if width % len(sources):
            return None
        part = width // len(sources)
        return Target(param, (expert, position * part, (position + 1) * part))


def translator(model):
    """A function from a stored weight name to its :class:`Target` in ``model`` (None when
    transformers cannot say), built once from the model's own conversion mapping."""
    try:
        converter = _Converter(model)
    except (ImportError, AttributeError, TypeError) as exc:
        log.debug("no checkpoint-name translation: %s", exc)
        return lambda stored: None

    def translate(stored: str) -> Target | None:
        try:
            return converter.resolve(stored, {})
        except (KeyError, ValueError, StopIteration):
            return None

    return translate


_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def needs_transformers(config: Mapping[str, Any] | None, stored: Iterable[str]) -> bool:
    """Whether transformers may load these names differently: multimodal and MoE models, and
    any layout other than the common ``model.*`` + ``lm_head`` one. Building the meta model
    costs ~3 s of imports, so plain dense checkpoints (whose names load unchanged) skip it;
    ``train.py`` translates stored names anyway, should a family rename them."""
    config = config or {}
    if is_multimodal(config) or any(config.get(k) for k in _MOE_KEYS):
        return True
    return not all(n.startswith(("model.", "lm_head.")) for n in stored)


def model_names(
    config: Mapping[str, Any] | None, tensors: Mapping[str, tuple[int, ...]]
) -> ModelNames:
    """The name map of a checkpoint with stored ``tensors`` (name -> shape) and ``config``."""
    multimodal = is_multimodal(config)
    if not needs_transformers(config, tensors):
        return _from_checkpoint(config, tensors, multimodal)
    if config and config.get("model_type"):
        try:
            return _with_transformers(config, tensors, multimodal)
        except ImportError:
            note = "transformers is not installed"
        except Exception as exc:  # an unknown or custom architecture: keep the stored names
            note = f"transformers cannot build {config.get('model_type')!r} ({exc})"
    else:
        note = "no config.json model_type"
    names = _from_checkpoint(config, tensors, multimodal)
    names.notes.append(f"{note}: the layer file uses the checkpoint's names")
    return names


@contextlib.contextmanager
def quiet_logger(name: str, level: int):
    """Logger ``name`` at ``level`` or above while the block runs, as it was after: a library's
    lines that do not matter here, or that only repeat an error we report in one line."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(before, level))
    try:
        yield
    finally:
        logger.setLevel(before)


def _with_transformers(config, tensors, multimodal) -> ModelNames:
    # transformers warns about configs built from partial dicts (token ids outside a tiny
    # vocabulary and the like); none of it matters for naming.
    with quiet_logger("transformers", logging.ERROR):
        model = meta_model(config)
    converter = _Converter(model)
    resolved = {name: converter.resolve(name, tensors) for name in tensors}
    unresolved = [name for name, target in resolved.items() if target is None]
    targets = {name: target or Target(name) for name, target in resolved.items()}
    by_id = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    inp_name, out_name = (by_id.get(id(getattr(m, "weight", None)), [None])[0] for m in (inp, out))
    tied = inp is not None and out is not None and out.weight is inp.weight
    # A tied head is an alias of the embedding: name it by its own path when it has one.
    head_module = next((n for n, m in model.named_modules() if m is out), None)
    out_name = f"{head_module}.weight" if head_module else out_name
    notes = []
    if unresolved:
        notes.append(
            f"{len(unresolved)} stored tensors have no counterpart in the loaded model and keep "
            f"their names, e.g. {unresolved[0]}"
        )
    return ModelNames(targets, inp_name, out_name, tied, multimodal, "transformers", notes)


def _from_checkpoint(config, tensors, multimodal) -> ModelNames:
    names = sorted(tensors)
    config = config or {}
    text = config.get("text_config") or {}
    vocab = config.get("vocab_size") or text.get("vocab_size")
    embedding = next((n for n in names if n.endswith(_INPUT_EMBEDDING_SUFFIXES)), None)
    if embedding is None and vocab:
        by_shape = [
            n
            for n, shape in sorted(tensors.items())
            if len(shape) == 2 and shape[0] == vocab and not n.endswith(_OUTPUT_HEAD_NAMES)
        ]
        embedding = by_shape[0] if len(by_shape) == 1 else None
    head = next(
        (n for n in names for h in _OUTPUT_HEAD_NAMES if n == h or n.endswith("." + h)), None
    )
    tie_flag = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings")))
    tied = embedding is not None and (head is None or tie_flag)
    if tied and head is None:
        head = "lm_head.weight"  # the alias transformers gives the shared matrix
    # MXFP4 blocks and scales are named after the parameter they load into.
    targets = {n: Target(mxfp4.base_name(n) or n) for n in names}
    return ModelNames(targets, embedding, head, tied, multimodal, "checkpoint names")
