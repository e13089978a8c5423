"""The real-speech corpus: manifest integrity, the split promises, the loader API and its errors."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from voxport.errors import CorpusError
from voxport.evaluate import corpus as corpus_mod
from voxport.evaluate.corpus import SAMPLE_RATES, Corpus, build_corpus, load_corpus

REAL_SOURCES = {"asterisk-core-sounds-en-wav", "codec2-examples", "alsa-utils"}


def test_manifest_files_exist_with_the_promised_rates_and_durations(corpus: Corpus) -> None:
    items = corpus.items()
    assert 40 <= len(items) <= 70
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert re.fullmatch(r"[a-z0-9_-]+", it.id), it.id
        assert it.split in ("calib", "eval") and it.lang in ("en", "zh")
        assert set(it.files) == {str(sr) for sr in SAMPLE_RATES}
        for sr in SAMPLE_RATES:
            info = sf.info(corpus.root / it.files[str(sr)])
            assert (info.samplerate, info.channels) == (sr, 1), it.id
            assert info.duration == pytest.approx(it.duration_s, abs=2e-3), it.id
        assert 1.0 <= it.duration_s <= 8.0, it.id
        assert it.license and it.native_sample_rate >= 8000


def test_every_real_speaker_with_two_clips_keeps_two_in_eval(corpus: Corpus) -> None:
    real = Counter(it.speaker for it in corpus.items() if it.source in REAL_SOURCES)
    multi = [s for s, n in real.items() if n >= 2]
    for speaker in multi:
        assert len(corpus.items("eval", speaker=speaker)) >= 2, speaker
    assert len(multi) >= 4
    assert {"allison", "alsa"} <= set(multi)
    assert len(corpus.items("calib", speaker="allison")) >= 2


def test_espeak_voices_are_in_both_splits_and_mandarin_is_present(corpus: Corpus) -> None:
    voices = {it.speaker for it in corpus.items() if it.source == "espeak-ng"}
    assert len({v for v in voices if v != "espeak-cmn"}) >= 4
    for voice in voices:
        assert corpus.items("calib", speaker=voice) and corpus.items("eval", speaker=voice), voice
    zh = corpus.items(lang="zh")
    assert len(zh) >= 2
    assert all(it.text and re.search(r"[\u4e00-\u9fff]", it.text) for it in zh)


def test_raw_paths_point_at_the_extracted_debian_files(corpus: Corpus) -> None:
    for it in corpus.items():
        raw = corpus.raw_path(it)
        if it.source == "espeak-ng":
            assert raw is None and it.source_path is None
        else:
            assert it.source in REAL_SOURCES and it.source_path.startswith(it.source + "/")
            assert raw is not None and raw.is_file(), it.id
    # Allison clips: 12 distinct prompts of 2-6 s, picked in sorted order.
    allison = [corpus.raw_path(it) for it in corpus.items(speaker="allison")]
    assert len(allison) == 12 and len(set(allison)) == 12
    assert sorted(p.name for p in allison) == [p.name for p in allison]
    assert all(2.0 <= sf.info(p).duration <= 6.0 for p in allison)


def test_audio_is_float32_mono_speech_at_both_rates(corpus: Corpus) -> None:
    it = corpus.items("eval", speaker="allison")[0]
    a16, a22 = corpus.audio(it, 16000), corpus.audio(it, 22050)
    assert a16.dtype == np.float32 and a16.ndim == 1
    assert len(a16) / 16000 == pytest.approx(len(a22) / 22050, abs=1e-3)
    assert np.abs(a16).max() <= 1.0 and np.sqrt(np.mean(a16**2)) > 1e-3
    # Both files are the same recording: the 22.05 kHz one resampled to 16 kHz matches closely.
    import librosa

    back = librosa.resample(a22, orig_sr=22050, target_sr=16000, res_type="soxr_hq")[: len(a16)]
    n = min(len(back), len(a16))
    assert np.corrcoef(back[:n], a16[:n])[0, 1] > 0.99
    with pytest.raises(ValueError, match="16000"):
        corpus.audio(it, 44100)


def test_item_filters_and_lookup(corpus: Corpus) -> None:
    assert len(corpus.items("calib")) + len(corpus.items("eval")) == len(corpus)
    assert {it.lang for it in corpus.items(lang="en")} == {"en"}
    first = corpus.items()[0]
    assert corpus.item(first.id) == first
    assert hash(first) == hash(corpus.item(first.id))
    with pytest.raises(ValueError, match="split"):
        corpus.items("train")
    with pytest.raises(KeyError):
        corpus.item("no-such-clip")


def test_rebuild_without_force_is_a_noop(corpus: Corpus) -> None:
    manifest = corpus.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert build_corpus(corpus.root) == corpus.root.resolve()
    assert manifest.stat().st_mtime_ns == before
    assert json.loads(manifest.read_text(encoding="utf-8"))["version"] == 1


def test_missing_corpus_names_the_build_command(tmp_path) -> None:
    with pytest.raises(CorpusError, match="python -m voxport.evaluate.corpus"):
        load_corpus(tmp_path / "nothing")


def test_never_replaces_a_directory_that_is_not_a_corpus(tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not a voxport corpus"):
        build_corpus(tmp_path, force=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_missing_espeak_names_the_apt_command_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    real_which = corpus_mod.shutil.which
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda n: None if n == "espeak-ng" else real_which(n))
    with pytest.raises(CorpusError, match="apt-get install -y espeak-ng"):
        build_corpus(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_failed_download_tells_to_run_apt_get_update(tmp_path) -> None:
    if corpus_mod.shutil.which("apt-get") is None:
        pytest.skip("needs apt-get")
    with pytest.raises(CorpusError, match="apt-get update"):
        corpus_mod._fetch_deb("voxport-no-such-package", tmp_path)
