"""The longer texts the generation routes' declarations show in the OpenAPI document: request examples
(tests check each against its schema) and what each event stream sends, in order."""

from __future__ import annotations

CHAT_EVENTS = """\
1. a role chunk: a `ChatCompletionChunk` whose delta is `{"role": "assistant", "content": ""}`;
2. content deltas (`delta.content`) and tool-call deltas (`delta.tool_calls`: a call's first delta has
   `index`, `id`, `type`, `function.name` and `arguments: ""`, later ones `index` and argument
   fragments; legacy `functions` requests get `delta.function_call` instead);
3. a final chunk with `delta: {}` and `finish_reason`;
4. when `stream_options.include_usage` is set, a chunk with `choices: []` and `usage`;
5. `data: [DONE]`."""

COMPLETION_EVENTS = """\
`TextCompletion` chunks: the echoed prompt first when `echo` is set, then text deltas, then a chunk with
empty `text` and `finish_reason`, then a usage chunk with `choices: []` when
`stream_options.include_usage` is set, then `data: [DONE]`."""

CHAT_EXAMPLES = {
    "simple": {"summary": "one user turn", "value": {
        "model": "qwen", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]}},
    "stream": {"summary": "streamed, with usage", "value": {
        "model": "qwen", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 3"}]}},
    "tools": {"summary": "function calling", "value": {
        "model": "qwen", "max_tokens": 32, "tool_choice": "auto",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}},
    "json_schema": {"summary": "structured output", "value": {
        "max_tokens": 32, "messages": [{"role": "user", "content": "A city as JSON"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}}}}},
}

COMPLETION_EXAMPLES = {
    "simple": {"summary": "a prompt", "value": {"model": "qwen", "prompt": "Once upon a time", "max_tokens": 16}},
}
