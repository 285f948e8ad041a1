"""Assistant-only loss on the chat templates models ship, compared with TRL token for token.

For every published template (tests/chat_templates.py: PUBLISHED, the originals as the pinned
TRL holds them) and every conversation of tests/conversations.py, ``data-check`` reads the rows
from a jsonl file as the job does, and the text that carries loss must equal what TRL's
``SFTTrainer(assistant_only_loss=True)`` trains, computed here with TRL's training template and
transformers' mask. A row that TRL or the template cannot render is refused by us with its
number, never a traceback. Templates TRL does not know go through the prefix rendering.
"""

from __future__ import annotations

import functools
import json

import pytest
from chat_templates import (
    MISTRAL,
    PUBLISHED,
    published,
    tokenizer_for_template,
    trained_runs,
    trl_trained_ids,
)
from conversations import CONVERSATIONS, SYSTEM, assistant, texts, user
from factories import run_cli

from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.training import chat
from spectrum_sm.training.data import DataOptions, encode_row
from spectrum_sm.training.datacheck import check_data

#: What TRL 1.16.0 has for each template: a training version, markers of its own, or nothing.
WAY = {name: "trl" for name in PUBLISHED} | {
    "lfm2_2_5": "markers",
    "llama3_1": "prefix",
    "llama3_2": "prefix",
    "gemma4": "prefix",
}


KNOWN_TO_TRL = sorted(name for name, way in WAY.items() if way != "prefix")


@functools.cache
def tokenizer_of(name: str):
    return tokenizer_for_template(published(name), texts())


def _check(folder, rows, tmp_path, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return check_data(str(data), str(folder), max_seq_length=4096, rows=len(rows), **options)


@pytest.mark.parametrize("name", KNOWN_TO_TRL)
def test_trained_text_is_trls_on_every_published_template(name, tmp_path):
    """Per row: data-check's trained text equals TRL's; rows TRL cannot take are refused."""
    tokenizer = tokenizer_of(name)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    accepted, refused = [], []
    for kind, row in CONVERSATIONS.items():
        try:
            accepted.append((kind, row, tokenizer.decode(trl_trained_ids(tokenizer, row))))
        except Exception:  # TRL (or the template) cannot render it: TRL trains nothing of it
            refused.append((kind, row))
    assert len(accepted) >= 5, f"{name}: too few conversations TRL accepts"
    report = _check(tmp_path / "tokenizer", [row for _, row, _ in accepted], tmp_path)
    assert report["loss_mask"].startswith(chat.WAYS[WAY[name]])
    for (kind, _, expected), example in zip(accepted, report["examples"], strict=True):
        assert example["trained_text"] == expected, f"{name} / {kind}"
        assert "".join(example["trained_parts"]) == expected, f"{name} / {kind}"
    for number, (kind, row) in enumerate(refused):
        with pytest.raises(SpectrumError, match=r"^data row 0: ") as error:
            _check(tmp_path / "tokenizer", [row], tmp_path / f"refused-{number}")
        assert "\n" not in str(error.value), f"{name} / {kind}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_way_of_each_published_template(name):
    way = chat.mask_way(tokenizer_of(name))
    assert way.kind == WAY[name]
    if way.kind == "trl":
        assert way.source == f"trl 1.16.0 {name}_training.jinja"


# --- the defects of the string-search masks, each on its real template ---------------------


@pytest.mark.parametrize(
    "name", ["qwen2_5", "qwen3", "qwen3_6", "deepseekv3", "glm4moe", "lfm2", "nemotron_3_nano"]
)
def test_a_think_turn_before_a_tool_call_only_turn_trains_as_trl_does(name):
    """It was a TypeError ('must be str, not int') on every Qwen-family template."""
    tokenizer = tokenizer_of(name)
    row = CONVERSATIONS["reasoning_then_tool_call_only_turn"]
    encoded = encode_row(row, 0, tokenizer, DataOptions(4096))
    trained = [
        t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label >= 0
    ]
    assert trained == trl_trained_ids(tokenizer, row)


def test_reasoning_that_restates_the_answer_is_trained_from_its_start():
    """The answer was searched for in the text and found inside the reasoning first."""
    tokenizer = tokenizer_of("qwen3")
    row = CONVERSATIONS["reasoning_restates_answer"]
    ids, mask = chat.render_with_mask(tokenizer, row["messages"])
    assert trained_runs(tokenizer, ids, mask) == [
        "<think>\nThe capital of France is Paris.\n</think>\n\n"
        "The capital of France is Paris.<|im_end|>\n"
    ]


@pytest.mark.parametrize("name", ["phi3", "phi3_5"])
def test_phi3_does_not_train_the_next_turns_user_token(name):
    """The end-of-turn marker was learned as the prefix '<|end|>\\n<|' of the next token."""
    tokenizer = tokenizer_of(name)
    ids, mask = chat.render_with_mask(tokenizer, CONVERSATIONS["multi_turn_system"]["messages"])
    user_token = tokenizer.convert_tokens_to_ids("<|user|>")
    assert user_token in ids
    assert not any(flag for token, flag in zip(ids, mask, strict=True) if token == user_token)
    assert trained_runs(tokenizer, ids, mask)[0] == "2 plus 3 is 5.<|end|>\n"


def test_gpt_oss_trains_the_channel_markers_the_model_writes():
    tokenizer = tokenizer_of("gptoss")
    ids, mask = chat.render_with_mask(tokenizer, CONVERSATIONS["single_turn"]["messages"])
    assert trained_runs(tokenizer, ids, mask) == [
        "<|start|>assistant<|channel|>final<|message|>2 plus 3 is 5.<|return|>"
    ]


def test_diffusion_gemma_tool_turns_are_masked_by_its_training_template():
    """Its turns render tool calls other than verbatim; they were refused."""
    tokenizer = tokenizer_of("diffusion_gemma")
    row = CONVERSATIONS["tool_call_dict_arguments"]
    ids, mask = chat.render_with_mask(tokenizer, row["messages"], row["tools"])
    assert [t for t, m in zip(ids, mask, strict=True) if m] == trl_trained_ids(tokenizer, row)
    assert trained_runs(tokenizer, ids, mask)[0].startswith("<|tool_call>call:get_weather{")


# --- templates TRL does not know: the prefix rendering -----------------------------------------

#: Originals whose TRL training version renders what they render, so the prefix rendering of
#: the original must train TRL's tokens (up to the whitespace at a trained run's end, which TRL's
#: blocks include and the prefix rendering leaves out).
AGREEING = ["llama3", "lfm2", "qwen3_instruct_2507", "gemma", "gemma3", "cohere"]


@pytest.mark.parametrize("name", AGREEING)
def test_the_prefix_rendering_trains_what_trl_trains_where_both_apply(name):
    original = published(name)
    unknown = original + "{#- a local copy: TRL does not recognise it -#}"
    tokenizer = tokenizer_for_template(unknown, texts())
    assert chat.mask_way(tokenizer).kind == "prefix"
    reference = tokenizer_of(name)
    compared = 0
    for kind, row in CONVERSATIONS.items():
        try:
            expected = reference.decode(trl_trained_ids(reference, row))
        except Exception:
            continue
        ids, mask = chat.render_with_mask(tokenizer, row["messages"], row.get("tools"))
        runs = trained_runs(tokenizer, ids, mask)
        ref_ids, ref_mask = chat.render_with_mask(reference, row["messages"], row.get("tools"))
        assert [r.rstrip() for r in runs] == [
            r.rstrip() for r in trained_runs(reference, ref_ids, ref_mask)
        ], f"{name} / {kind}"
        assert "".join(runs).replace("\n", "") == expected.replace("\n", ""), f"{name} / {kind}"
        compared += 1
    assert compared >= 5


@pytest.mark.parametrize("name", ["llama3_1", "llama3_2", "gemma4"])
def test_the_prefix_rendering_trains_every_answer_and_no_prompt(name):
    """Published templates without a TRL training version: each assistant answer is trained,
    no user, system or tool text is, and the header the generation prompt writes is not."""
    tokenizer = tokenizer_of(name)
    prompt_header = chat._apply(tokenizer, [user("x")], tokenize=False, add_generation_prompt=True)[
        len(chat._apply(tokenizer, [user("x")], tokenize=False)) :
    ]
    assert prompt_header.strip()
    for kind, row in CONVERSATIONS.items():
        messages = row["messages"]
        try:
            ids, mask = chat.render_with_mask(tokenizer, messages, row.get("tools"))
        except SpectrumError as refused:
            assert str(refused).startswith(("message ", "the chat template refuses")), kind
            continue
        trained = "".join(trained_runs(tokenizer, ids, mask))
        answers = [m.get("content") or "" for m in messages if m["role"] == "assistant"]
        for message in messages:
            content = message.get("content") or ""
            if message["role"] == "assistant":
                assert content.rpartition("</think>")[2].strip() in trained, f"{name} / {kind}"
            elif content and not any(content in answer for answer in answers):
                assert content not in trained, f"{name} / {kind}"
        assert prompt_header.strip() not in trained, f"{name} / {kind}"


def test_a_row_that_is_not_prefix_preserving_is_refused_by_data_check(tmp_path):
    """Mistral-style: the system prompt moves to the last user turn, so earlier turns render
    differently once the conversation goes on. One line, the row's number, the ways out."""
    tokenizer = tokenizer_for_template(MISTRAL, texts())
    tokenizer.save_pretrained(tmp_path / "tok")
    good = {"messages": [user("What is 2 plus 3?"), assistant("It is 5.")]}
    bad = {
        "messages": [
            SYSTEM,
            user("What is 2 plus 3?"),
            assistant("It is 5."),
            user("And 4 plus 4?"),
            assistant("It is 8."),
        ]
    }
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, bad]))
    proc = run_cli("data-check", str(data), "--model", str(tmp_path / "tok"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data row 2: message 2: the chat template is not prefix-")
    assert "--chat_template_path" in line and "--assistant_only_loss false" in line
    assert proc.stderr.count("error:") == 1


def test_a_chat_template_with_generation_blocks_is_the_way_out(tmp_path):
    """The same rows through ``--chat-template-path`` with {% generation %} blocks: masked."""
    tokenizer = tokenizer_for_template(MISTRAL, texts())
    tokenizer.save_pretrained(tmp_path / "tok")
    marked = MISTRAL.replace(
        "{{- ' ' + message.content + eos_token }}",
        "{% generation %}{{- ' ' + message.content + eos_token }}{% endgeneration %}",
    )
    assert marked != MISTRAL
    (tmp_path / "marked.jinja").write_text(marked)
    row = {"messages": [SYSTEM, user("2+3?"), assistant("It is 5."), user("4+4?"), assistant("8.")]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    proc = run_cli(
        "data-check", str(data), "--model", str(tmp_path / "tok"),
        "--chat-template-path", str(tmp_path / "marked.jinja"), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loss_mask"] == chat.WAYS["markers"]
    assert report["examples"][0]["trained_parts"] == [" It is 5.<|eos|>", " 8.<|eos|>"]
    shown = run_cli(
        "data-check", str(data), "--model", str(tmp_path / "tok"),
        "--chat-template-path", str(tmp_path / "marked.jinja"),
    )  # fmt: skip
    assert "loss mask: the template's {% generation %} markers" in shown.stdout


def test_an_assistant_turn_with_nothing_before_it_is_refused():
    tokenizer = tokenizer_for_template(MISTRAL, texts())
    with pytest.raises(SpectrumError, match=r"^data row 4: message 0 is an assistant turn"):
        encode_row({"messages": [assistant("Hi.")]}, 4, tokenizer, DataOptions(256))


def test_the_prefix_rendering_tokenizes_as_the_tokenizer_does():
    """The backend encode the prefix rendering uses gives the tokenizer's own ids."""
    tokenizer = tokenizer_of("llama3_1")
    for row in CONVERSATIONS.values():
        try:
            ids, _ = chat.render_with_mask(tokenizer, row["messages"], row.get("tools"))
        except SpectrumError:
            continue
        assert (
            ids
            == tokenizer.apply_chat_template(
                row["messages"], tools=row.get("tools"), tokenize=True, return_dict=True
            )["input_ids"]
        )


def test_a_rows_chat_template_kwargs_reach_the_template_as_in_trl():
    tokenizer = tokenizer_of("qwen3")
    row = {**CONVERSATIONS["single_turn"], "chat_template_kwargs": {"enable_thinking": False}}
    encoded = encode_row(row, 0, tokenizer, DataOptions(4096))
    trained = [
        t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label >= 0
    ]
    assert trained == trl_trained_ids(tokenizer, row)
    with pytest.raises(SpectrumError, match="data row 3: 'chat_template_kwargs' must be an obj"):
        encode_row({**row, "chat_template_kwargs": "no"}, 3, tokenizer, DataOptions(4096))


def test_no_trl_import_for_a_template_trl_does_not_hold():
    """Deciding the way for an unknown template reads TRL's template files, not its modules
    (importing TRL costs seconds in every tokenizing process)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path[:0] = ['tests', '.']\n"
        "from chat_templates import CHATML, tokenizer_for_template\n"
        "from spectrum_sm.training import chat\n"
        "tok = tokenizer_for_template(CHATML, ['a b c'] * 5)\n"
        "assert chat.mask_way(tok).kind == 'prefix'\n"
        "print(sorted(m for m in sys.modules if m == 'trl' or m.startswith('trl.')))\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.strip() == "[]"


def test_a_character_split_over_several_tokens_is_trained_whole():
    """Byte-level tokenizers split a character they never merged ('✨' is three bytes) into
    tokens that share its offsets; every one of them is trained when the answer ends on it
    (a template with no end-of-turn marker, as a user's own may be)."""
    plain = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer = tokenizer_for_template(plain, ["user assistant: hello there"] * 20)
    messages = [user("Hi"), assistant("Shiny ✨"), user("Again")]
    ids, mask = chat.render_with_mask(tokenizer, messages)
    assert len(tokenizer.backend_tokenizer.encode("✨").ids) > 1
    assert trained_runs(tokenizer, ids, mask) == ["Shiny ✨"]
