"""pypinyin for the shipped text front end: the real one when the Python backend's environment has it,
else a stand-in that passes text without Han characters through unchanged (what pypinyin does with
it: `lazy_pinyin("Hello world")` is `["Hello world"]`) and refuses Han text, naming what to install.
"""

from __future__ import annotations

import re

try:
    from pypinyin import Style, lazy_pinyin
except ImportError:
    _HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")

    class Style:  # the one member the text front end passes
        TONE3 = "TONE3"

    def lazy_pinyin(text: str, style: object = None, neutral_tone_with_five: bool = False) -> list[str]:
        if _HAN.search(text):
            raise ValueError("Chinese text needs pypinyin in the Triton Python backend's environment "
                             "(pip install pypinyin, or a custom execution environment)")
        return [text]

__all__ = ["Style", "lazy_pinyin"]
