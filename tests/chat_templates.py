# ruff: noqa: E501  (chat templates are data: one Jinja statement per line)
"""Chat templates for the loss-mask tests: the published ones, and a few written here.

PUBLISHED: the original templates that models ship, as TRL 1.16.0 (pinned in pyproject.toml)
keeps them in ``trl/chat_templates/<name>.jinja`` to recognise them byte for byte (a weekly TRL
CI job, ``scripts/check_chat_templates.py``, fails when a reference Hub repo ships a template it
does not hold). Each entry says which checkpoints ship it, from TRL's chat_templates/README.md.

Written here, after the real ones, for templates TRL does not know: QWEN3 follows Qwen3's
template (the reasoning of every assistant turn but those after the last user message is dropped,
and the last turn always gets a possibly empty think block: not prefix-preserving); GEMMA folds
the system prompt into the first user turn; MISTRAL puts it in the last user turn (not
prefix-preserving); LLAMA3 uses header tokens and trims contents; CHATML is plain; CHATML_MARKED
has generation markers.
"""

import re
from pathlib import Path

QWEN3 = """
{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(found=false, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if not ns.found and message.role == 'user' %}
{%- set ns.found = true %}{%- set ns.last_query_index = index %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content %}
{%- set reasoning_content = '' %}
{%- if message.reasoning_content is defined and message.reasoning_content is not none %}
{%- set reasoning_content = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

GEMMA = """
{{- bos_token }}
{%- if messages[0].role == 'system' %}
{%- set first = messages[0].content + '\\n\\n' %}{%- set rest = messages[1:] %}
{%- else %}{%- set first = '' %}{%- set rest = messages %}{%- endif %}
{%- for message in rest %}
{%- set role = 'model' if message.role == 'assistant' else message.role %}
{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message.content | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}
"""

MISTRAL = """
{%- if messages[0].role == 'system' %}
{%- set system = messages[0].content %}{%- set rest = messages[1:] %}
{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}
{%- set ns = namespace(last_user=0) %}
{%- for message in rest %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{{- bos_token }}
{%- for message in rest %}
{%- if message.role == 'user' %}
{%- if loop.index0 == ns.last_user and system %}
{{- '[INST] ' + system + '\\n\\n' + message.content + '[/INST]' }}
{%- else %}
{{- '[INST] ' + message.content + '[/INST]' }}
{%- endif %}
{%- else %}
{{- ' ' + message.content + eos_token }}
{%- endif %}
{%- endfor %}
"""

LLAMA3 = """
{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

CHATML = """
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CHATML_MARKED = """
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

#: name -> (template, end-of-turn marker, bos, eos)
TEMPLATES = {
    "qwen3": (QWEN3, "<|im_end|>"),
    "gemma": (GEMMA, "<end_of_turn>"),
    "mistral": (MISTRAL, "</s>"),
    "llama3": (LLAMA3, "<|eot_id|>"),
    "chatml": (CHATML, "<|im_end|>"),
    "chatml_marked": (CHATML_MARKED, "<|im_end|>"),
}
SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "[INST]",
    "<tool_call>",
    "</tool_call>",
    "[/INST]",
    "<think>",
    "</think>",
]


def tokenizer_for(name: str, texts: list[str]):
    """A tiny byte-level BPE tokenizer with ``name``'s template and every special token."""
    template, eot = {**TEMPLATES, **TEMPLATES_WITH_TOOLS}[name]
    return _tiny_tokenizer(template, texts, ["<|endoftext|>", *SPECIALS], "<s>", eot, 400)


def _tiny_tokenizer(template: str, texts: list[str], specials, bos, eos, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``; ``specials[0]`` is the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=specials[0],
        chat_template=template,
    )


#: ChatML with tool calls (as Qwen's and Hermes' templates write them) and tool results.
CHATML_TOOLS = """
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in message.tool_calls or [] %}{{- '<tool_call>' + call.function.name + '(' + call.function.arguments + ')</tool_call>' }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
TEMPLATES_WITH_TOOLS = {"chatml_tools": (CHATML_TOOLS, "<|im_end|>")}


#: name -> who ships it (TRL 1.16.0's trl/chat_templates/README.md); the text is
#: trl/chat_templates/<name>.jinja of the pinned TRL.
PUBLISHED = {
    "qwen2_5": "Qwen2.5 instruct checkpoints (Qwen/Qwen2.5-*-Instruct)",
    "qwen3": "Qwen3 checkpoints (Qwen/Qwen3-*)",
    "qwen3_instruct_2507": "Qwen/Qwen3-4B-Instruct-2507",
    "qwen3_5_think": "Qwen3.5 checkpoints (thinking by default)",
    "qwen3_6": "Qwen3.6-27B, Qwen3.6-35B-A3B and their FP8 variants",
    "llama3": "Meta Llama 3 instruct checkpoints",
    "llama3_1": "Meta Llama 3.1 instruct checkpoints (no TRL training version)",
    "llama3_2": "Meta Llama 3.2 instruct checkpoints (no TRL training version)",
    "gemma": "Gemma (v1) and Gemma 2, identical templates",
    "gemma3": "google/gemma-3-* checkpoints",
    "phi3": "Microsoft Phi-3 checkpoints",
    "phi3_5": "Microsoft Phi-3.5 checkpoints",
    "deepseekv3": "DeepSeek-V3",
    "glm4moe": "GLM-4.5 (GLM-4-MoE) checkpoints",
    "gptoss": "openai/gpt-oss-20b and gpt-oss-120b",
    "cohere": "CohereLabs/aya-expanse-8b",
    "nemotron_3_nano": "nvidia/NVIDIA-Nemotron-3-Nano-* checkpoints",
    "lfm2": "LiquidAI/LFM2-* checkpoints",
    "lfm2_2_5": "LiquidAI/LFM2.5-230M (ships {% generation %} markers itself)",
    "diffusion_gemma": "google/diffusiongemma-26B-A4B-it",
    "gemma4": "google/gemma-4-E2B-it at 6b7e72c (no TRL training version)",
}

#: Control tokens as templates write them: <|im_start|>, <｜Assistant｜>, <|channel>,
#: <start_of_turn>, </think>, [INST], <BOS_TOKEN>.
_CONTROL = re.compile(
    r"<\|[^<>\s|]+\|>|<｜[^｜]+｜>|<\|[A-Za-z_]+>|<[A-Za-z_]+\|>|</?[a-z_]+>|\[/?[A-Z_]+\]|<[A-Z_]+>"
)


def published(name: str) -> str:
    """The original template ``name`` as the pinned TRL holds it."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text("utf-8")


def tokenizer_for_template(template: str, texts: list[str], vocab_size: int = 600):
    """A tiny byte-level BPE tokenizer carrying ``template``, with every control token the
    template writes as an added special token (as the real tokenizers have them)."""
    controls = sorted(set(_CONTROL.findall(template)) - {"<|bos|>", "<|eos|>", "<|pad|>"})
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", *controls]
    return _tiny_tokenizer(template, texts, specials, "<|bos|>", "<|eos|>", vocab_size)


def trl_trained_ids(tokenizer, row: dict) -> list[int]:
    """The token ids TRL's ``SFTTrainer(assistant_only_loss=True)`` trains in ``row``,
    computed as it does: the tokenizer's template when it has generation markers, else TRL's
    training template; transformers' assistant mask. Raises what TRL or the template raises."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    training = None if has_generation_markers(template) else get_training_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(
        row["messages"],
        chat_template=training,
        tools=row.get("tools"),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **row.get("chat_template_kwargs", {}),
    )
    return [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]


def trained_runs(tokenizer, ids: list[int], trained: list[bool]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, flag in zip(ids, trained, strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs
