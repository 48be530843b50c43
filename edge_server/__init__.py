"""edge-server: an OpenAI-compatible chat server for GGUF Qwen models over llama-cpp-python.

ARCHITECTURE.md at the repository root maps the rooms: api/, generation/, dialects/, engine/, devtools/.
"""

__version__ = "0.1.0"
