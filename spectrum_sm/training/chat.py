"""Which tokens of a conversation carry loss: the assistant's, exactly as TRL computes them.

The mask is never guessed from strings. One of three ways is chosen per chat template:

1. **template markers**: the template has ``{% generation %}`` blocks; transformers turns them
   into the mask (``return_assistant_tokens_mask``). This is TRL's ``assistant_only_loss``.
2. **TRL training template**: TRL knows the template (a published one, matched byte for byte
   by ``trl.chat_template_utils.get_training_chat_template``) and ships a training version of it
   with ``{% generation %}`` blocks. The conversation is rendered *with that training version*
   and masked by its blocks: the same tokens TRL's ``SFTTrainer(assistant_only_loss=True)``
   trains. The training version renders what the original renders, except where the original
   is not prefix-preserving: Qwen3-family training templates keep every assistant turn's think
   block, where the original drops the reasoning of turns before the last user message. So the
   model learns each turn as it wrote it; at inference it sees the original's rendering of past
   turns. The model's saved tokenizer keeps the original template.
3. **prefix rendering**: any other template. Each assistant turn ``i`` is rendered twice: the
   conversation before it with ``add_generation_prompt=True`` (the prompt), and the conversation
   up to and including it. What the turn adds to its prompt is trained. Per row, the template
   must be prefix-preserving there (the prompt is the start of the turn's rendering, which is
   the start of the whole conversation's); a row where it is not is refused, naming the row.

In the first two ways the template's blocks decide what is trained. TRL's training templates
leave out the header the generation prompt writes (``<|im_start|>assistant\\n``) and train what
the model writes after it (channel markers, think tags, reasoning, answer, tool calls, the
end-of-turn marker and mostly the newline after it); a few also train a header the model
itself writes between its own messages (gpt-oss's ``<|start|>assistant``, DeepSeek's
``<｜Assistant｜>``). The prefix rendering follows the same convention: the generation prompt's
text is not trained, everything the turn adds after it is, except the whitespace after the
turn's last character. A token is trained when any of its characters is (transformers' rule
for generation blocks).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError

log = logging.getLogger(__name__)

#: The TRL release whose training templates decide the masks (pinned in pyproject.toml's
#: ``train`` extra; a training job carries this machine's copy in its code channel).
TRL_VERSION = "1.16.0"
#: How a template's mask was obtained, as ``data-check`` and the training log name it.
WAYS = {
    "markers": "the template's {% generation %} markers",
    "trl": "TRL's training template",
    "prefix": "prefix rendering (each assistant turn rendered after its prompt)",
}
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")
WAYS_OUT = (
    "use a chat template with {% generation %} blocks (--chat_template_path), or train on every "
    "token with --assistant_only_loss false"
)


@dataclass(frozen=True)
class MaskWay:
    """How one chat template's masks are made: ``kind`` (a key of :data:`WAYS`), the template
    that renders the conversation, and where that template comes from (for the log)."""

    kind: str
    template: str
    source: str

    def describe(self) -> str:
        return f"{WAYS[self.kind]}{f' ({self.source})' if self.source else ''}"


_WAYS: dict[str, MaskWay] = {}


def mask_way(tokenizer: Any, template: str | None = None) -> MaskWay:
    """The way masks are made for ``template`` (default: the tokenizer's own), decided once."""
    template = template or _template_of(tokenizer)
    if template not in _WAYS:
        if _MARKERS.search(template):
            way = MaskWay("markers", template, "")
        elif _trl_holds(template) and (training := _trl_training_template(tokenizer, template)):
            way = MaskWay("trl", *training)
        else:
            way = MaskWay("prefix", template, "")
        _WAYS[template] = way
        log.info("assistant-only loss: %s", way.describe())
    return _WAYS[template]


def _template_of(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named variants: "default" is the one a plain call uses
        template = template.get("default")
    if not template:
        raise SpectrumError("the tokenizer has no chat template; 'messages' rows need one")
    return template


def _trl_holds(template: str) -> bool:
    """Is ``template`` one of the published originals TRL holds? TRL returns a training
    template only for those (it matches them byte for byte), so any other template goes to the
    prefix rendering without importing TRL, which costs seconds per process."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    spec, found = importlib.util.find_spec("trl"), ""
    with contextlib.suppress(PackageNotFoundError):
        found = version("trl")
    if spec is None or not spec.submodule_search_locations or not trl_is_recent(found):
        _trl()  # raises the install or upgrade hint
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    return any(
        f.read_text("utf-8") == template
        for f in folder.glob("*.jinja")
        if not f.stem.endswith("_training")
    )


def _trl():
    try:
        import trl
        from trl import chat_template_utils
    except ImportError as exc:
        raise SpectrumError(
            f"assistant-only loss needs TRL's training chat templates (trl>={TRL_VERSION}): "
            f"pip install 'spectrum-sm[train]' ({exc})"
        ) from None
    if not trl_is_recent(trl.__version__):
        raise SpectrumError(
            f"assistant-only loss needs trl>={TRL_VERSION} (its training chat templates); "
            f"trl {trl.__version__} is installed: pip install 'spectrum-sm[train]'"
        )
    return trl, chat_template_utils


def trl_is_recent(version: str) -> bool:
    """Is ``version`` (a TRL release) the pinned one or later?"""
    return bool(version) and _version_tuple(version) >= _version_tuple(TRL_VERSION)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _trl_training_template(tokenizer: Any, template: str) -> tuple[str, str] | None:
    """TRL's training version of ``template`` and its file name, or None when TRL has none."""
    trl, utils = _trl()
    probe = tokenizer
    if template != _template_of(tokenizer):  # a --chat_template_path template: TRL reads the
        import copy  # tokenizer's, so it looks at a copy carrying this one

        probe = copy.copy(tokenizer)
        probe.chat_template = template
    try:
        training = utils.get_training_chat_template(probe)
    except ValueError:  # "patching is not supported for this template": TRL does not know it
        return None
    except Exception as exc:  # TRL's own probes broke on it (SFTTrainer would stop here too):
        # the prefix rendering, exact or refused, decides instead
        log.warning("TRL could not examine the chat template (%s); prefix rendering", exc)
        return None
    if training is None:  # already marked and prefix-preserving (checked before us)
        return None
    folder = Path(utils.__file__).parent / "chat_templates"
    files = sorted(folder.glob("*_training.jinja"))
    name = next((f.name for f in files if f.read_text("utf-8") == training), "training template")
    return training, f"trl {trl.__version__} {name}"


#: From TRL's dist-info: what says which release it is, and its licence (Apache-2.0).
_TRL_METADATA = ("METADATA", "WHEEL", "top_level.txt", "LICENSE")


def trl_code_files() -> list[tuple[Path, str]]:
    """The files of the installed TRL that the masks need, as (file, path relative to the
    folder holding ``trl/``): the modules ``trl.chat_template_utils`` imports, its templates,
    and its metadata and licence (``trl-<version>.dist-info``, so that the copy, first on the
    path, is also the version ``importlib.metadata`` and ``trl.__version__`` report). A
    training job's code channel carries them, so the job masks with the same templates as this
    machine whatever TRL its image has."""
    import sys
    from importlib.metadata import distribution

    trl, _ = _trl()
    package = Path(trl.__file__).parent
    files = {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if (name == "trl" or name.startswith("trl.")) and getattr(module, "__file__", None)
    }
    files |= set((package / "chat_templates").glob("*.jinja"))
    chosen = [(f, str(f.relative_to(package.parent))) for f in files]
    dist = distribution("trl")
    for entry in dist.files or []:
        if entry.parts[0].endswith(".dist-info") and entry.name in _TRL_METADATA:
            chosen.append((Path(dist.locate_file(entry)), str(entry)))
    return sorted(chosen)


def read_chat_template(path: str | Path) -> str:
    """A Jinja chat template from a file, or from the one ``.jinja`` file in a folder (a job's
    ``chat_template`` channel)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".jinja" and p.is_file())
        if len(found) != 1:
            raise SpectrumError(
                f"chat template folder {path} must hold one .jinja file, found {len(found)}"
            )
        path = found[0]
    if not path.is_file():
        raise SpectrumError(f"chat template {str(path)!r} does not exist")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpectrumError(f"cannot read the chat template {path}: {exc}") from None
    if not text.strip():
        raise SpectrumError(f"chat template {path} is empty")
    check_chat_template(text, str(path))
    return text


def check_chat_template(text: str, where: str) -> None:
    """Refuse what cannot be a chat template before any row is rendered with it: JSON (a
    tokenizer_config.json, whose ``chat_template`` value is the template), Jinja that does not
    compile (named here, not blamed on a data row), or a template that never reads ``messages``
    (every row would render the same text)."""
    import json

    if text.lstrip().startswith("{"):
        try:
            json.loads(text)
        except ValueError:
            pass
        else:
            raise SpectrumError(
                f"chat template {where} is JSON, not a Jinja template: give the template's text "
                "(e.g. the chat_template value of a tokenizer_config.json, saved as a .jinja file)"
            )
    # Renamed in another transformers: the rendering itself still checks.
    with contextlib.suppress(ImportError):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            _compile_jinja_template(text)
        except Exception as exc:  # jinja2's TemplateSyntaxError and its kin
            line = getattr(exc, "lineno", None)
            at = f" at line {line}" if line else ""
            raise SpectrumError(f"chat template {where} does not compile{at}: {exc}") from None
    if "messages" not in text:
        raise SpectrumError(
            f"chat template {where} never reads `messages`, so every row would render the same "
            "text: give a chat template that loops over the conversation"
        )


# --- rendering and masking -------------------------------------------------------------------


def render_with_mask(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list | None = None,
    *,
    template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    assistant_only: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and which of them the assistant wrote (every one, when
    not ``assistant_only``: the conversation as the template renders it, all of it trained).

    ``template`` replaces the tokenizer's chat template; ``template_kwargs`` reach the template
    (``enable_thinking``, ``reasoning_effort``, ...), as a row's ``chat_template_kwargs`` do in
    TRL. Raises :class:`SpectrumError` (naming the message) when the template refuses the
    conversation or when no exact mask exists for it."""
    way = mask_way(tokenizer, template) if assistant_only else None
    template = way.template if way else template or _template_of(tokenizer)
    kwargs = {**(template_kwargs or {}), "chat_template": template, "tools": tools}
    if way is None or way.kind in ("markers", "trl"):
        out = _apply(
            tokenizer,
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=way is not None,
            **kwargs,
        )
        ids = list(out["input_ids"])
        return ids, [bool(m) for m in out["assistant_masks"]] if way else [True] * len(ids)
    text, spans = prefix_spans(tokenizer, messages, **kwargs)
    # Tokenized as apply_chat_template tokenizes a rendering (no special tokens added), by the
    # fast tokenizer's backend directly: what the tokenizer's own call runs, without its wrapping.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SpectrumError(
            f"assistant-only loss needs a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} is not one"
        )
    encoding = backend.encode(text, add_special_tokens=False)
    return list(encoding.ids), _overlapping(encoding, spans)


def _apply(tokenizer: Any, conversation: list, **kwargs: Any) -> Any:
    """``apply_chat_template``, with what the template raises as one line."""
    try:
        return tokenizer.apply_chat_template(conversation, **kwargs)
    except SpectrumError:
        raise
    except Exception as exc:  # the template's own refusal (raise_exception, a type it rejects)
        text = " ".join(str(exc).split())
        text = text if len(text) <= 200 else text[:197] + "..."
        raise SpectrumError(
            f"the chat template refuses this conversation ({type(exc).__name__}: {text})"
        ) from None


def prefix_spans(
    tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans its assistant turns add, from
    rendering each turn's prompt and the turn itself (see the module's third way)."""
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    ends_with_turn = bool(turns) and turns[-1] == len(messages) - 1
    if turns and turns[0] == 0:
        raise SpectrumError(
            "message 0 is an assistant turn with no prompt before it, so the prefix rendering "
            f"cannot tell its header from its text; {WAYS_OUT}"
        )
    # Batched: one template call renders every prompt, one every turn (and the whole).
    prompts = (
        _apply(
            tokenizer,
            [messages[:i] for i in turns],
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )
        if turns
        else []
    )
    closed = _apply(
        tokenizer,
        [messages[: i + 1] for i in turns] + ([] if ends_with_turn else [messages]),
        tokenize=False,
        **kwargs,
    )
    full = closed[-1]
    spans: list[tuple[int, int]] = []
    for number, prompt, turn in zip(turns, prompts, closed, strict=False):
        end = len(turn.rstrip())
        if not turn.startswith(prompt) or not full.startswith(turn[:end]):
            why = (
                "the turn does not start with its generation prompt"
                if not turn.startswith(prompt)
                else "the turns after it change how it renders"
            )
            raise SpectrumError(
                f"message {number}: the chat template is not prefix-preserving here ({why}), "
                f"so no exact loss mask exists for this row; {WAYS_OUT}"
            )
        start = len(prompt)
        if spans and start < spans[-1][1]:
            raise SpectrumError(
                f"message {number}: the chat template renders this assistant turn inside the "
                f"previous one; {WAYS_OUT}"
            )
        if end > start:
            spans.append((start, end))
        elif messages[number].get("content") or messages[number].get("tool_calls"):
            raise SpectrumError(
                f"message {number}: the chat template renders nothing of this assistant turn; "
                + WAYS_OUT
            )
    return full, spans


def _overlapping(encoding: Any, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does it overlap a span. A span's edge tokens come from the tokenizer's own
    index (``char_to_token``), widened to every token that shares the edge character (a
    byte-level tokenizer splits a character it never merged into tokens with the same offsets);
    a span edge no token covers falls back to comparing every token's offsets."""
    offsets = encoding.offsets
    mask = [False] * len(offsets)
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            mask = [m or (b > start and a < end) for m, (a, b) in zip(mask, offsets, strict=True)]
            continue
        while first > 0 and offsets[first - 1][1] > start:
            first -= 1
        while last + 1 < len(offsets) and offsets[last + 1][0] < end:
            last += 1
        mask[first : last + 1] = [True] * (last + 1 - first)
    return mask
