"""The rows of one UNet call, as every patch of the pack reads them (and as other packs' patches already do).

ComfyUI's contract (``samplers.py::_calc_cond_batch``, 0.3.75 and current master alike): a UNet call holds
``len(transformer_options["cond_or_uncond"])`` contiguous chunks of equal size; entry i is the index, in the list of
conditionings the guider passed to ``calc_cond_batch``, of the conditioning of chunk i - for KSampler/CFGGuider
0 = positive, 1 = negative (order not guaranteed: ComfyUI batches ``[1, 0]``). ``uuids`` has one entry per chunk too.
Patches split rows with ``chunk = rows // len(cond_or_uncond)`` (IPAdapter, SAG, NAG, ...).

The pack keeps that contract when it adds rows (BootPIG's batched reference rows, ``reference_attention.py``):

* appended rows come **after** the sampler's chunks, padded to **whole chunks** of the same size;
* each appended chunk gets a ``cond_or_uncond`` entry (``0``: reference rows are encoded with the reference prompt,
  by default the positive prompt, so to every other patch they are conditional rows) and a ``uuids`` entry;
* ``transformer_options[REFERENCE_CHUNKS]`` counts the appended chunks at the end (absent = 0), so a patch that wants
  to tell generated rows from reference rows can.

Guiders that batch more than two conditionings use further indices, as ComfyUI's own ``Guider_PerpNeg`` does
(``[positive, negative, empty]`` -> 0, 1, 2). The pack's BootPIG three-branch guider passes
``[positive, negative, negative]`` (the third: the negative prompt *with* the reference) and says which indices are
negative-prompt rows in ``transformer_options[UNCOND_KINDS]`` (default ``(1,)``) and which read the reference in
``transformer_options[REFERENCE_KINDS]`` (default ``(0,)``).
"""
from __future__ import annotations

import logging

REFERENCE_CHUNKS = "personalize.reference_chunks"
UNCOND_KINDS = "personalize.uncond_kinds"
REFERENCE_KINDS = "personalize.reference_kinds"

POSITIVE, NEGATIVE, REFERENCE = "positive", "negative", "reference"

log = logging.getLogger("personalize.rows")
_warned: set = set()


def chunk_kinds(options: dict) -> list:
    """``cond_or_uncond`` of this call ([0] when absent: a call made outside the sampler's batching)."""
    return list(options.get("cond_or_uncond") or [0])


def chunk_size(options: dict, rows: int) -> int | None:
    """Rows per chunk, or None when ``rows`` is not a whole number of chunks (some patch broke the contract)."""
    n = len(chunk_kinds(options))
    if rows % n != 0:
        key = (rows, n)
        if key not in _warned:
            _warned.add(key)
            log.warning("a UNet call with %d rows and %d entries in cond_or_uncond: some patch added rows without "
                        "extending cond_or_uncond; rows are treated as conditional", rows, n)
        return None
    return rows // n


def uncond_kinds(options: dict) -> tuple:
    return tuple(options.get(UNCOND_KINDS, (1,)))


def reference_chunks(options: dict) -> int:
    return int(options.get(REFERENCE_CHUNKS, 0))


def chunk_roles(options: dict) -> list[str]:
    """Per chunk: 'positive', 'negative' (negative-prompt rows) or 'reference' (rows appended by BootPIG)."""
    kinds = chunk_kinds(options)
    neg = uncond_kinds(options)
    n_ref = reference_chunks(options)
    first_ref = len(kinds) - n_ref
    return [REFERENCE if i >= first_ref else (NEGATIVE if k in neg else POSITIVE) for i, k in enumerate(kinds)]


def row_roles(options: dict, rows: int) -> list[str]:
    """Per row of a call with ``rows`` rows (all 'positive' if the contract is broken)."""
    per = chunk_size(options, rows)
    if per is None:
        return [POSITIVE] * rows
    return [r for r in chunk_roles(options) for _ in range(per)]


def row_is_uncond(options: dict, rows: int) -> list[bool]:
    """Per row: True for negative-prompt rows (reference rows are conditional: they carry the reference prompt)."""
    return [r == NEGATIVE for r in row_roles(options, rows)]


def generated_rows(options: dict, rows: int) -> int:
    """How many leading rows are the sampler's own (the rest are appended reference rows)."""
    per = chunk_size(options, rows)
    if per is None:
        return rows
    return rows - per * reference_chunks(options)


def with_appended_chunks(options: dict, count: int, kind: int, uuids: list) -> dict:
    """A shallow copy of ``options`` for a call with ``count`` more chunks of ``kind`` at the end."""
    to = dict(options)
    to["cond_or_uncond"] = chunk_kinds(options) + [kind] * count
    old = list(options.get("uuids") or [])
    to["uuids"] = old + list(uuids)[:count]
    to[REFERENCE_CHUNKS] = reference_chunks(options) + count
    return to
