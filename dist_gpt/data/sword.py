"""A reader for SWORD zText Bible modules (the Spanish Reina-Valera 1909 comes as Debian's `sword-text-sparv`).

A zText module keeps each testament (`ot`, `nt`) in three files:
  .bzs  block index, 12 bytes per block: uint32 offset in .bzz, uint32 compressed size, uint32 size
  .bzv  verse index, 10 bytes per slot:  uint32 block number, uint32 start in the block, uint16 size
  .bzz  the zlib-compressed blocks, concatenated
All little-endian. A slot's text is block[start : start + size], UTF-8 OSIS markup; size 0 is an empty slot.

The slots follow the versification (KJV here), which reserves slots that are not verses: one for the module, one
per testament, one per book intro and one per chapter intro. osis2mod (which built these modules) writes the
`<chapter sID="Gen.1"/>` start tag into the chapter-intro slot, and that is how we recover chapters: every slot
that opens a chapter starts a new one. A module without OSIS chapter tags (ThML, GBF, plain) has no such marks,
and then `read_chapters` falls back to one verse per document.

Markup is stripped the way a reader would see the text: headings (`<title>`) and footnotes (`<note>`) go with
their content, every other tag goes but its content stays, entities are unescaped and whitespace collapsed. A
slot with no text left (book and chapter intros, empty verses) is not a verse.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from dist_gpt.errors import UserError

BIBLE_ES_MODULE = Path("/usr/share/sword/modules/texts/ztext/spaRV1909eb")
BIBLE_ES_PACKAGE = "sword-text-sparv"
TESTAMENTS = ("ot", "nt")  # the order of the books
MODULE_SUFFIXES = (".bzs", ".bzv", ".bzz")
BLOCK_ENTRY = struct.Struct("<III")
SLOT_ENTRY = struct.Struct("<IIH")

_DROPPED_ELEMENTS = re.compile(r"<(title|note)\b[^>]*?(?<!/)>.*?</\1\s*>", re.DOTALL)  # with their content
_TAG = re.compile(r"<[^>]*>")
_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=")


def osis_to_text(markup: str) -> str:
    """Plain text of an OSIS fragment. Tags are removed without a space: the text between them already has its
    spaces (`<w>Dios</w>.` must stay "Dios.")."""
    text = _TAG.sub("", _DROPPED_ELEMENTS.sub("", markup))
    return " ".join(html.unescape(text).split())


def module_files(module_dir: str | Path = BIBLE_ES_MODULE) -> list[Path]:
    """The module's index and data files, testament by testament. UserError if there is no module there."""
    module_dir = Path(module_dir)
    files = []
    for testament in TESTAMENTS:
        parts = [module_dir / f"{testament}{suffix}" for suffix in MODULE_SUFFIXES]
        present = [p.is_file() for p in parts]
        if all(present):
            files += parts
        elif any(present):
            missing = next(p for p, here in zip(parts, present) if not here)
            raise UserError(f"SWORD module {module_dir} is incomplete: {missing} is missing (reinstall the module)")
    if not files:
        hint = f"install it with `apt-get install {BIBLE_ES_PACKAGE}`" if module_dir == BIBLE_ES_MODULE else "point to a zText module directory"
        raise UserError(f"no SWORD zText module in {module_dir} (expected ot/nt .bzs/.bzv/.bzz): {hint}")
    return files


def read_slots(module_dir: str | Path = BIBLE_ES_MODULE) -> Iterator[str]:
    """Every slot's raw markup in versification order, empty slots included (as "")."""
    for testament in TESTAMENTS:
        base = Path(module_dir) / testament
        if not base.with_suffix(".bzv").is_file():
            continue  # an NT-only (or OT-only) module
        blocks = _read_blocks(base)
        slots = base.with_suffix(".bzv").read_bytes()
        for block_number, start, size in SLOT_ENTRY.iter_unpack(slots[: len(slots) - len(slots) % SLOT_ENTRY.size]):
            if size == 0:
                yield ""
                continue
            if block_number >= len(blocks) or start + size > len(blocks[block_number]):
                raise UserError(f"SWORD module {base}.bzv points outside its blocks: the module is damaged, reinstall it")
            yield blocks[block_number][start : start + size].decode("utf-8", errors="replace")


def _read_blocks(base: Path) -> list[bytes]:
    """All blocks of one testament, decompressed (the whole Bible is ~15 MB of markup)."""
    compressed = base.with_suffix(".bzz").read_bytes()
    index = base.with_suffix(".bzs").read_bytes()
    blocks = []
    for offset, compressed_size, size in BLOCK_ENTRY.iter_unpack(index[: len(index) - len(index) % BLOCK_ENTRY.size]):
        try:
            block = zlib.decompress(compressed[offset : offset + compressed_size])
        except zlib.error as e:
            raise UserError(f"SWORD module {base}.bzz has a corrupt block at byte {offset} ({e}): reinstall the module") from None
        if len(block) != size:
            raise UserError(f"SWORD module {base}.bzz: a block at byte {offset} is {len(block)} bytes, its index says {size}: reinstall the module")
        blocks.append(block)
    return blocks


def read_verses(module_dir: str | Path = BIBLE_ES_MODULE) -> list[str]:
    """The verses' plain text, in order, without empty slots and intros."""
    return [verse for chapter in read_chapter_verses(module_dir) for verse in chapter]


def read_chapters(module_dir: str | Path = BIBLE_ES_MODULE) -> list[str]:
    """One string per chapter, its verses joined with "\\n" (without chapter tags: one string per verse)."""
    return ["\n".join(chapter) for chapter in read_chapter_verses(module_dir)]


def read_chapter_verses(module_dir: str | Path = BIBLE_ES_MODULE) -> list[list[str]]:
    """Verses grouped by chapter: a chapter-start tag opens a new group, and text in that slot (rare: a heading
    that survives stripping) belongs to the new chapter. A module with no chapter tags gives one verse a group."""
    module_files(module_dir)  # a clear error before anything else
    chapters: list[list[str]] = [[]]
    has_chapter_tags = False
    for markup in read_slots(module_dir):
        if _CHAPTER_START.search(markup):
            has_chapter_tags = True
            if chapters[-1]:
                chapters.append([])
        text = osis_to_text(markup)
        if text:
            chapters[-1].append(text)
    if not has_chapter_tags:
        return [[verse] for verse in chapters[0]]
    return [chapter for chapter in chapters if chapter]
