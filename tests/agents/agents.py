"""The coding agents, each set up as a new user would point it at the server (its one-line set-up in the
README), run non-interactively with a throwaway HOME, updates and telemetry off, and nothing but 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AGENTS_DIR = Path(os.environ.get("EDGE_SERVER_AGENTS", Path.home() / ".cache" / "edge-server" / "agents"))
NPM_BIN = AGENTS_DIR / "npm" / "node_modules" / ".bin"
AIDER_BIN = AGENTS_DIR / "aider" / "bin"
MODEL = "qwen"  # the id the server is started with (--model-alias)

# What every agent runs with: no telemetry, no update checks, no proxy between it and the loopback server.
QUIET = {"DO_NOT_TRACK": "1", "NO_UPDATE_NOTIFIER": "1", "npm_config_update_notifier": "false",
         "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "NO_COLOR": "1", "CI": "1",
         "TERM": "dumb"}


@dataclass
class Run:
    """What an agent did: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Agent:
    """One agent: its executable, how a new user configures it for `base_url`, and its prompt command."""

    name: str
    executable: Path
    configure: Callable[[Path, str], dict[str, str]]  # (home, base_url) -> environment; writes config files
    command: Callable[[str, Path], list[str]]  # (prompt, home) -> argv after the executable

    def run(self, prompt: str, *, base_url: str, home: Path, cwd: Path, timeout: float = 900) -> Run:
        """Run the agent once on `prompt` in `cwd` and wait for it."""
        home.mkdir(parents=True, exist_ok=True)
        env = {"PATH": f"{NPM_BIN}:{AIDER_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home),
               "LANG": "C.UTF-8", **QUIET, **self.configure(home, base_url)}
        done = subprocess.run([str(self.executable), *self.command(prompt, home)], cwd=cwd, env=env, timeout=timeout,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return Run(done.returncode, done.stdout, done.stderr)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _claude(model: str) -> Callable[[Path, str], dict[str, str]]:
    def configure(home: Path, base_url: str) -> dict[str, str]:
        return {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "none", "ANTHROPIC_MODEL": model,
                "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    return configure


def _codex(home: Path, base_url: str) -> dict[str, str]:
    _write(home / ".codex" / "config.toml", f'''model = "{MODEL}"
model_provider = "edge"
check_for_update_on_startup = false

[model_providers.edge]
name = "edge-server"
base_url = "{base_url}/v1"
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false
''')
    return {}


def _opencode(home: Path, base_url: str) -> dict[str, str]:
    _write(home / ".config" / "opencode" / "opencode.json", json.dumps({
        "$schema": "https://opencode.ai/config.json", "model": f"edge/{MODEL}", "autoupdate": False,
        "share": "disabled", "provider": {"edge": {
            "npm": "@ai-sdk/openai-compatible", "name": "edge-server",
            "options": {"baseURL": f"{base_url}/v1", "apiKey": "none"}, "models": {MODEL: {"name": MODEL}}}}}))
    return {"OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1"}


def _qwen(home: Path, base_url: str) -> dict[str, str]:
    _write(home / ".qwen" / "settings.json", json.dumps({
        "general": {"enableAutoUpdate": False}, "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False}}))
    return {"OPENAI_BASE_URL": f"{base_url}/v1", "OPENAI_API_KEY": "none", "OPENAI_MODEL": MODEL}


def _continue(home: Path, base_url: str) -> dict[str, str]:
    _write(home / ".continue" / "config.yaml", f"""name: edge-server
version: 0.0.1
schema: v1
models:
  - name: {MODEL}
    provider: openai
    model: {MODEL}
    apiBase: {base_url}/v1
    apiKey: none
    roles: [chat, edit, apply]
""")
    return {"CONTINUE_CLI_ENABLE_TELEMETRY": "0", "CONTINUE_METRICS_ENABLED": "0"}


def _aider(home: Path, base_url: str) -> dict[str, str]:
    return {"OPENAI_API_BASE": f"{base_url}/v1", "OPENAI_API_KEY": "none", "AIDER_ANALYTICS_DISABLE": "true",
            "AIDER_CHECK_UPDATE": "false"}


AGENTS = {agent.name: agent for agent in [
    Agent("claude-code", NPM_BIN / "claude", _claude(MODEL), lambda prompt, home: ["-p", prompt]),
    Agent("claude-code-claude-name", NPM_BIN / "claude", _claude("claude-sonnet-4-5"),
          lambda prompt, home: ["-p", prompt]),
    Agent("codex", NPM_BIN / "codex", _codex, lambda prompt, home: ["exec", "--skip-git-repo-check", prompt]),
    Agent("opencode", NPM_BIN / "opencode", _opencode, lambda prompt, home: ["run", prompt]),
    Agent("qwen-code", NPM_BIN / "qwen", _qwen, lambda prompt, home: ["-p", prompt]),
    Agent("continue", NPM_BIN / "cn", _continue,
          lambda prompt, home: ["--config", str(home / ".continue" / "config.yaml"), "-p", prompt]),
    Agent("aider", AIDER_BIN / "aider", _aider,
          lambda prompt, home: ["--model", f"openai/{MODEL}", "--message", prompt, "--yes-always", "--no-git",
                                "--no-show-model-warnings", "--no-check-update", "--analytics-disable"]),
]}
