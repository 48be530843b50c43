"""The real coding agents against the real server (`make test-agents`): each runs from the install cache
(`EDGE_SERVER_AGENTS`, default ~/.cache/edge-server/agents; `make test-agents` fills it from npm and PyPI)
through a recording proxy. A missing agent fails its test with the way to install it, never skips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.agents import AGENTS, AGENTS_DIR, MODEL, Agent, Run
from tests.agents.recorder import Recorder
from tests.conftest import qwen_scripted_model  # noqa: F401 (fixture)
from tests.e2e.conftest import start_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.agents


def installed(name: str) -> Agent:
    """The agent `name`, or a failure saying how to install it."""
    agent = AGENTS[name]
    if not agent.executable.is_file():
        pytest.fail(f"{agent.name} is not installed in {AGENTS_DIR} ({agent.executable} is missing): "
                    "`make test-agents` installs every agent there", pytrace=False)
    return agent


@pytest.fixture
def recorder_for() -> Iterator:
    """Factory: recorder_for(server) -> a recording proxy in front of it; closed at the end."""
    recorders: list[Recorder] = []

    def make(server) -> Recorder:
        recorders.append(Recorder(f"127.0.0.1:{server.port}"))
        return recorders[-1]

    yield make
    for recorder in recorders:
        recorder.close()


def report(agent: Agent, run: Run, recorder: Recorder) -> str:
    """What to print when an agent's run fails the test."""
    lines = [f"{agent.name} exited {run.returncode}", f"stdout: {run.stdout[-2000:]}", f"stderr: {run.stderr[-3000:]}"]
    lines += [f"{e.method} {e.path} -> {e.status}" for e in recorder.exchanges]
    return "\n".join(lines)


def serve(start_server, model: Path, *args: str):  # noqa: F811 (the fixture, passed in)
    """A server on `model` under the id the agents are configured with."""
    return start_server("--model", str(model), "--model-alias", MODEL, "--parallel", "2", *args)
