import pytest

from voxport.errors import ConfigError
from voxport.models.text import (
    basic_cleaners,
    encode_text,
    english_cleaners,
    ids_to_text,
    split_fragments,
    symbols,
    text_to_ids,
    to_pinyin,
)


def test_symbol_tables_match_mockingbird_ids():
    cur, old, rtvc = symbols(75), symbols(70), symbols(66)
    assert (len(cur), len(old), len(rtvc)) == (75, 70, 66)
    assert cur[:2] == old[:2] == rtvc[:2] == ("_", "~")
    current_ids = {"A": 2, "Z": 27, "a": 28, "z": 53, "1": 54, "9": 62, "0": 63, "!": 64, "?": 73, " ": 74}
    for ch, idx in current_ids.items():
        assert cur.index(ch) == idx
    for ch, idx in {"1": 54, "4": 57, "0": 58, "!": 59, "?": 68, " ": 69}.items():
        assert old.index(ch) == idx
    assert "5" not in old and "5" in cur
    assert '"' in rtvc and "1" not in rtvc
    with pytest.raises(ConfigError, match="71"):
        symbols(71)


def test_basic_cleaners_lowercases_and_collapses_whitespace():
    assert basic_cleaners("Ni3  HAO3\t\nma5") == "ni3 hao3 ma5"


def test_english_cleaners_expands_abbreviations_and_transliterates():
    assert english_cleaners("Dr. Müller  met Mr. Smith") == "doctor muller met mister smith"


def test_split_fragments_follows_mockingbird_punctuation():
    text = "你好，世界！今天\n天气很好、是吧,OK。\n\n  好吗？对.行!"
    assert split_fragments(text) == ["你好", "世界", "今天", "天气很好", "是吧", "OK", "好吗？对.行!"]
    assert split_fragments("，。！\n  ") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("欢迎使用工具箱", "huan1 ying2 shi3 yong4 gong1 ju4 xiang1"),
        ("你好吗", "ni3 hao3 ma5"),
        ("Hello world", "Hello world"),
        ("我有3个苹果 OK", "wo3 you3 3 ge4 ping2 guo3  OK"),
    ],
)
def test_to_pinyin_examples(text, expected):
    assert to_pinyin(text) == expected


def test_text_to_ids_current_table_appends_eos():
    ids = text_to_ids("ni3 hao3 ma5")
    assert ids == [41, 36, 56, 74, 35, 28, 42, 56, 74, 40, 28, 58, 1]
    assert ids_to_text(ids) == "ni3 hao3 ma5~"


def test_text_to_ids_old_table_drops_neutral_tone_five():
    ids = text_to_ids("ni3 hao3 ma5", n_symbols=70)
    assert ids_to_text(ids, 70) == "ni3 hao3 ma~"
    assert ids[2] == 56 and ids[3] == 69  # '3' and space in the 70-symbol table


def test_text_to_ids_drops_unknown_characters(caplog):
    with caplog.at_level("DEBUG", logger="voxport.models.text"):
        ids = text_to_ids("A😀b  #c")
    assert ids_to_text(ids) == "ab c~"
    assert "dropped 2 character" in caplog.text


@pytest.mark.parametrize("text", ["", "   ", "😀#", "~_", "!? ,"])
def test_text_to_ids_rejects_unspeakable_text(text):
    with pytest.raises(ConfigError, match="no speakable characters"):
        text_to_ids(text)


def test_rtvc_table_drops_digits():
    assert ids_to_text(text_to_ids("Room 101, Dr. X", n_symbols=66), 66) == "room , doctor x~"


def test_encode_text_full_front_end():
    assert encode_text("你好吗，欢迎") == [
        text_to_ids("ni3 hao3 ma5"),
        text_to_ids("huan1 ying2"),
    ]
    with pytest.raises(ConfigError, match="empty"):
        encode_text("，。\n")
