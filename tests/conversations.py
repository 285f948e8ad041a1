"""Conversations of the kinds users bring, for the loss-mask tests on published chat templates.

Each is a data row (``messages`` and, where the conversation calls tools, ``tools``): multi-turn
with a system prompt, ``<think>`` inside content, ``reasoning_content`` and ``thinking`` fields,
reasoning that restates the answer, tool calls with arguments as dicts and as JSON strings,
several calls in one turn, tool results, and an agent trace.
"""

from __future__ import annotations

import json

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}


def call(name: str, arguments: dict, *, as_json: bool = False) -> dict:
    """A tool call as OpenAI-style data writes it: arguments as a dict or as a JSON string."""
    args = json.dumps(arguments) if as_json else arguments
    return {"type": "function", "function": {"name": name, "arguments": args}}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **fields) -> dict:
    return {"role": "assistant", "content": text, **fields}


def tool(name: str, text: str) -> dict:
    return {"role": "tool", "name": name, "content": text}


SYSTEM = {"role": "system", "content": "You are a careful assistant."}

CONVERSATIONS: dict[str, dict] = {
    "single_turn": {"messages": [user("What is 2 plus 3?"), assistant("2 plus 3 is 5.")]},
    "multi_turn_system": {
        "messages": [
            SYSTEM,
            user("What is 2 plus 3?"),
            assistant("2 plus 3 is 5."),
            user("And 4 plus 4?"),
            assistant("4 plus 4 is 8."),
        ]
    },
    "think_in_content": {
        "messages": [
            user("What is 6 times 7?"),
            assistant("<think>\nSix sevens: 42.\n</think>\n\n6 times 7 is 42."),
        ]
    },
    "reasoning_content_multi_turn": {
        "messages": [
            SYSTEM,
            user("What is 2 plus 3?"),
            assistant("It is 5.", reasoning_content="Two and three make five."),
            user("And 4 plus 4?"),
            assistant("It is 8.", reasoning_content="Four and four make eight."),
        ]
    },
    "thinking_field": {
        "messages": [
            user("Name a prime above 10."),
            assistant("11 is a prime.", thinking="The first prime above 10 is 11."),
        ]
    },
    "reasoning_restates_answer": {
        "messages": [
            user("What is the capital of France?"),
            assistant(
                "The capital of France is Paris.",
                reasoning_content="The capital of France is Paris.",
            ),
        ]
    },
    "think_restates_answer_in_content": {
        "messages": [
            user("What is 9 minus 4?"),
            assistant("<think>\n9 minus 4 is 5.\n</think>\n\n9 minus 4 is 5."),
        ]
    },
    "tool_call_dict_arguments": {
        "tools": [WEATHER_TOOL],
        "messages": [
            user("Weather in Paris?"),
            assistant("", tool_calls=[call("get_weather", {"city": "Paris"})]),
            tool("get_weather", '{"temperature": 21, "sky": "clear"}'),
            assistant("It is 21 degrees and clear in Paris."),
        ],
    },
    "tool_call_json_string_arguments": {
        "tools": [WEATHER_TOOL],
        "messages": [
            user("Weather in Oslo, in celsius?"),
            assistant(
                "",
                tool_calls=[call("get_weather", {"city": "Oslo", "unit": "C"}, as_json=True)],
            ),
            tool("get_weather", '{"temperature": 3}'),
            assistant("It is 3 degrees in Oslo."),
        ],
    },
    "several_calls_in_one_turn": {
        "tools": [WEATHER_TOOL, ADD_TOOL],
        "messages": [
            user("Weather in Rome and Lima, and 2 plus 2?"),
            assistant(
                "Let me check.",
                tool_calls=[
                    call("get_weather", {"city": "Rome"}),
                    call("get_weather", {"city": "Lima"}),
                    call("add", {"a": 2, "b": 2}),
                ],
            ),
            tool("get_weather", '{"temperature": 25}'),
            tool("get_weather", '{"temperature": 18}'),
            tool("add", "4"),
            assistant("Rome 25, Lima 18, and 2 plus 2 is 4."),
        ],
    },
    "reasoning_then_tool_call_only_turn": {
        # An assistant turn with a <think> block, then a turn that only calls a tool.
        "tools": [ADD_TOOL],
        "messages": [
            user("What is 2 plus 3?"),
            assistant("<think>\nEasy.\n</think>\n\n2 plus 3 is 5."),
            user("Now add 10 and 20 with the tool."),
            assistant("", tool_calls=[call("add", {"a": 10, "b": 20})]),
            tool("add", "30"),
            assistant("10 plus 20 is 30."),
        ],
    },
    "agent_trace": {
        "tools": [WEATHER_TOOL, ADD_TOOL],
        "messages": [
            SYSTEM,
            user("How much warmer is Cairo than Oslo?"),
            assistant(
                "",
                reasoning_content="I need both temperatures first.",
                tool_calls=[call("get_weather", {"city": "Cairo"})],
            ),
            tool("get_weather", '{"temperature": 30}'),
            assistant(
                "",
                reasoning_content="Now Oslo.",
                tool_calls=[call("get_weather", {"city": "Oslo"}, as_json=True)],
            ),
            tool("get_weather", '{"temperature": 4}'),
            assistant(
                "Cairo is 26 degrees warmer than Oslo.",
                reasoning_content="30 minus 4 is 26.",
            ),
        ],
    },
}


def texts() -> list[str]:
    """Every string in the conversations, to train a tiny tokenizer on."""
    return [json.dumps(row) for row in CONVERSATIONS.values()] * 5
