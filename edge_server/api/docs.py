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

RESPONSES_EVENTS = """\
Server-sent events, sent when the request has `"stream": true`: each is `event: <type>` and
`data: <JSON>` with that `type`, numbered by `sequence_number` from 0 (SSE comments, `: ping`, keep a quiet
stream alive):
1. `response.created` and `response.in_progress`, each with the `response` so far (no output yet);
2. per output item, in order (reasoning, then the message, then function calls):
   `response.output_item.added` (`output_index`, `item`), then
   - reasoning: `response.reasoning_text.delta` events (`item_id`, `content_index` 0, `delta`), then
     `response.reasoning_text.done` (`text`);
   - a message: `response.content_part.added` (`part`: an empty `output_text`),
     `response.output_text.delta` events, `response.output_text.done` (`text`), `response.content_part.done`;
   - a function call: `response.function_call_arguments.delta` events, then
     `response.function_call_arguments.done` (`name`, `arguments`);
   and `response.output_item.done` with the whole item;
3. `response.completed` with the whole `response` and `usage`; `response.incomplete` when
   `max_output_tokens` cut it (`incomplete_details.reason: max_output_tokens`); `response.failed` with
   `response.error` when the generation failed.
No `data: [DONE]` follows."""

_WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

RESPONSES_EXAMPLES = {
    "simple": {"summary": "a string input", "value": {
        "model": "qwen", "instructions": "Be brief.", "input": "Hello!", "max_output_tokens": 32}},
    "stream": {"summary": "streamed", "value": {"model": "qwen", "input": "Count to 3", "stream": True}},
    "tools": {"summary": "a function tool", "value": {
        "model": "qwen", "input": "Weather in Paris?", "tools": [_WEATHER_TOOL], "tool_choice": "auto"}},
    "tool_result": {"summary": "a function call's output handed back", "value": {
        "model": "qwen", "tools": [_WEATHER_TOOL], "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "{\"temperature\": 21}"}]}},
    "json_schema": {"summary": "structured output", "value": {
        "input": "A city as JSON", "text": {"format": {"type": "json_schema", "name": "city", "strict": True, "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}}}}},
    "reasoning": {"summary": "thinking off", "value": {"input": "Hi", "reasoning": {"effort": "none"}}},
}
