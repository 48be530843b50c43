"""A whole tool round trip, offline: the (scripted) model calls the agent's own file-reading tool on hello.py,
the agent reads it and sends the result back, the model answers, the agent prints the answer and exits 0."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.agents.conftest import installed, report, serve

# The path is in the model's script, so it is fixed: one folder per agent under the temporary directory.
WORK = Path(tempfile.gettempdir()) / "edge-server-agent-round-trip"
MARKER = "marker-5d1c"
HELLO = f'print("Hello from hello.py")  # {MARKER}\n'
ANSWER = "hello.py prints: Hello from hello.py"
AFTER_A_TURN = "<|im_end|>\n<|im_start|>assistant\n"  # Qwen2.5's generation prompt after any message
AFTER_A_RESULT = "</tool_response><|im_end|>\n<|im_start|>assistant\n"  # ... after a tool result
# agent -> its tool that reads a file, and that tool's arguments for a path
READERS = {"claude-code": ("Read", lambda path: {"file_path": path}),
           "opencode": ("read", lambda path: {"filePath": path}),
           "qwen-code": ("read_file", lambda path: {"file_path": path}),
           "continue": ("Read", lambda path: {"filepath": path}),
           "codex": ("exec_command", lambda path: {"cmd": f"cat {path}"})}


@pytest.mark.parametrize("name", list(READERS))
def test_the_model_reads_a_file_with_the_agents_tool_and_answers(name, start_server, qwen_scripted_model,
                                                                  recorder_for, tmp_path):
    agent = installed(name)
    tool, arguments = READERS[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "hello.py").write_text(HELLO)
    call = json.dumps({"name": tool, "arguments": arguments(str(work / "hello.py"))})
    model = qwen_scripted_model("qwen2.5", f"<tool_call>\n{call}\n</tool_call>", after=AFTER_A_TURN,
                                replies=((AFTER_A_RESULT, ANSWER),))
    recorder = recorder_for(serve(start_server, model))
    run = agent.run("What does hello.py print?", base_url=recorder.base_url, home=tmp_path / "home", cwd=work)
    assert not recorder.problems(), "\n".join(recorder.problems()) + "\n" + report(agent, run, recorder)
    assert run.returncode == 0 and ANSWER in run.stdout, report(agent, run, recorder)
    # The agent ran its tool: the file's text went back to the model, as a tool result.
    sent = [e for e in recorder.generations() if MARKER in e.text()]
    assert sent, report(agent, run, recorder)
    called = [e for e in recorder.generations() if f'"name": "{tool}"' in e.response.decode().replace('\\"', '"')
              or f'"name":"{tool}"' in e.response.decode()]
    assert called and recorder.generations().index(called[0]) < recorder.generations().index(sent[0])
