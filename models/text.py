"""Text front end of the MockingBird / RTVC synthesizer: fragments, pinyin, cleaners, symbol ids.

MockingBird turns Chinese into tone-numbered pinyin (pypinyin TONE3, neutral tone 5) and then spells
that pinyin with a small Latin symbol table; the model never sees Han characters. Three tables
exist in the wild and a checkpoint only works with the one it was trained on (its
`encoder.embedding.weight` row count tells which):

- 75 symbols: current MockingBird (`_`, `~`, A-Z, a-z, 1234567890, !'(),-.:;? and space)
- 70 symbols: early MockingBird, digits `12340` only (no `5`, so the neutral tone is dropped)
- 66 symbols: RTVC English (letters, !'"(),-.:;? and space; no digits), `english_cleaners`
"""

from __future__ import annotations

import logging
import re
import unicodedata

from pypinyin import Style, lazy_pinyin

from voxport.errors import ConfigError

log = logging.getLogger(__name__)

PAD = "_"  # id 0, never produced from text
EOS = "~"  # id 1, appended to every fragment
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CHARACTERS = {
    75: _LETTERS + "1234567890!'(),-.:;? ",
    70: _LETTERS + "12340!'(),-.:;? ",
    66: _LETTERS + "!'\"(),-.:;? ",
}
SYMBOL_TABLE_SIZES = tuple(sorted(_CHARACTERS))

# MockingBird splits on these (full-width !, full-width comma, 。, 、, ASCII comma), not on ？；：.!?
_FRAGMENT_SPLIT_RE = re.compile(r"[！，。、,]+")
_WHITESPACE_RE = re.compile(r"\s+")
# RTVC's english_cleaners abbreviation list (expanded before the table lookup drops the period).
_ABBREVIATIONS = [
    (re.compile(rf"\b{abbr}\.", re.IGNORECASE), full)
    for abbr, full in [
        ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
        ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"),
        ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"),
        ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"), ("ft", "fort"),
    ]
]


def symbols(n_symbols: int = 75) -> tuple[str, ...]:
    """The symbol table of the given size; index = id."""
    if n_symbols not in _CHARACTERS:
        raise ConfigError(f"unknown symbol table size {n_symbols}; known sizes: {SYMBOL_TABLE_SIZES}")
    return (PAD, EOS, *_CHARACTERS[n_symbols])


def basic_cleaners(text: str) -> str:
    """MockingBird's cleaner: lowercase and collapse whitespace runs to one space (no transliteration)."""
    return _WHITESPACE_RE.sub(" ", text.lower())


def english_cleaners(text: str) -> str:
    """An approximation of RTVC's `english_cleaners` without its `unidecode`/`inflect` dependencies.

    Transliterates by Unicode decomposition (accents dropped) instead of unidecode, expands the
    same abbreviations, and does NOT spell out numbers: digits are not in the 66-symbol table, so
    they are dropped (RTVC would say them). Write numbers as words for RTVC checkpoints.
    """
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = text.lower()
    for pattern, full in _ABBREVIATIONS:
        text = pattern.sub(full, text)
    return _WHITESPACE_RE.sub(" ", text)


def split_fragments(text: str) -> list[str]:
    """Split on newlines, then on runs of `！，。、,`; strip; drop empty pieces (MockingBird's rule)."""
    fragments: list[str] = []
    for line in text.splitlines():
        fragments.extend(piece.strip() for piece in _FRAGMENT_SPLIT_RE.split(line))
    return [f for f in fragments if f]


def to_pinyin(fragment: str) -> str:
    """Han characters → space-separated TONE3 pinyin with neutral tone 5; other text passes through.

    `欢迎使用工具箱` → `huan1 ying2 shi3 yong4 gong1 ju4 xiang1`, `你好吗` → `ni3 hao3 ma5`.
    Non-Han runs are kept verbatim as one item, so mixed text may gain a double space (the cleaner
    collapses it). Arabic digits are left as digits and read like tone marks, as in MockingBird.
    """
    return " ".join(lazy_pinyin(fragment, style=Style.TONE3, neutral_tone_with_five=True))


def text_to_ids(fragment: str, n_symbols: int = 75) -> list[int]:
    """Clean a (pinyin) fragment and map it to symbol ids, EOS (`~`, id 1) appended.

    Characters outside the table are dropped, as MockingBird does. Raises ConfigError when no letter
    or digit is left: a spaces/punctuation/EOS-only input makes the synthesizer produce noise.
    """
    table = symbols(n_symbols)
    cleaned = english_cleaners(fragment) if n_symbols == 66 else basic_cleaners(fragment)
    to_id = {s: i for i, s in enumerate(table) if s not in (PAD, EOS)}
    ids = [to_id[c] for c in cleaned if c in to_id]
    dropped = len(cleaned) - len(ids)
    if dropped:
        log.debug("dropped %d character(s) not in the %d-symbol table from %r", dropped, n_symbols, fragment)
    if not any(table[i].isalnum() for i in ids):
        raise ConfigError(
            f"text {fragment!r} has no speakable characters for the {n_symbols}-symbol table "
            "(after pinyin conversion and cleaning)"
        )
    return ids + [table.index(EOS)]


def ids_to_text(ids: list[int], n_symbols: int = 75) -> str:
    """Inverse of `text_to_ids` for debugging (EOS and padding shown as `~` and `_`)."""
    table = symbols(n_symbols)
    return "".join(table[i] for i in ids)


def encode_text(text: str, n_symbols: int = 75) -> list[list[int]]:
    """Full front end: fragments → pinyin → ids, one id list per fragment (each ends with EOS).

    Raises ConfigError when the text has no fragment, or a fragment has nothing speakable.
    """
    fragments = split_fragments(text)
    if not fragments:
        raise ConfigError("text is empty (nothing left after splitting on newlines and punctuation)")
    return [text_to_ids(to_pinyin(f), n_symbols) for f in fragments]
