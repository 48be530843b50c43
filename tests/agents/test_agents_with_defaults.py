"""Every coding agent, set up with its defaults as the README's one line says, answers a prompt through the
server: it exits 0 and prints the answer, and none of its generation requests got a 4xx/5xx or a broken stream."""

from __future__ import annotations

import pytest

from tests.agents.agents import AGENTS
from tests.agents.conftest import installed, report, serve

ANSWER = "Hello from edge-server, the local model."


@pytest.fixture(scope="module")
def server(start_server, qwen_scripted_model):
    """Qwen2.5's template and vocabulary; the reply to any turn is ANSWER."""
    return serve(start_server, qwen_scripted_model("qwen2.5", ANSWER, after="<|im_end|>\n<|im_start|>assistant\n"))


@pytest.mark.parametrize("name", list(AGENTS))
def test_the_agent_answers_with_its_defaults(name, server, recorder_for, tmp_path):
    agent = installed(name)
    recorder = recorder_for(server)
    work = tmp_path / "work"
    work.mkdir()
    run = agent.run("Say hello.", base_url=recorder.base_url, home=tmp_path / "home", cwd=work)
    assert recorder.generations(), report(agent, run, recorder)
    assert not recorder.problems(), "\n".join(recorder.problems()) + "\n" + report(agent, run, recorder)
    assert run.returncode == 0 and ANSWER in run.stdout, report(agent, run, recorder)
