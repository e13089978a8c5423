"""The stage cache: an unchanged pass is not rerun, a changed gate re-judges without re-transforming,
a config change reruns only the passes it decides, entries are content-addressed and atomic."""

import threading
from pathlib import Path

import pytest
from conftest import compose_config

from voxport.errors import ParityError
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.cache import StageCache, key
from voxport.pipeline.engine import build_bundle
from voxport.pipeline.passes import PASSES
from voxport.pipeline.records import Record
from voxport.quantize.config import QuantizeConfig

SMALL = ("stages=export_only", "stack.synthesizer.max_decoder_steps=20", "validation.vocoder_clips=1",
         "validation.max_clip_seconds=1.0", "validation.synthesizer_steps=8", "validation.encoder_clips=1")


def _shas(bundle) -> dict[str, str]:
    return {r.file: r.sha256 for r in bundle.records}


@pytest.mark.slow
def test_a_rebuild_with_nothing_changed_reuses_every_pass_and_judgement(corpus, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = compose_config(*SMALL, f"out_dir={tmp_path / 'a'}", f"cache_dir={cache}", f"corpus_dir={corpus.root}")
    first = build_bundle(cfg)
    assert first.cache["hits"] == [] and len(first.cache["misses"]) == 6  # 3 exports, 3 judgements
    cfg = compose_config(*SMALL, f"out_dir={tmp_path / 'b'}", f"cache_dir={cache}", f"corpus_dir={corpus.root}")
    second = build_bundle(cfg)
    assert second.cache["misses"] == [] and len(second.cache["hits"]) == 6
    assert _shas(second) == _shas(first)
    for r in second.records:  # the files really are there, byte for byte
        assert sha256_file(second.path / r.file) == r.sha256
    by_file = {r.file: r for r in first.records}
    assert all(r.parity == by_file[r.file].parity for r in second.records)

    # A tighter tolerance re-judges the reused export (and fails it) without exporting again.
    cfg = compose_config(*SMALL, f"out_dir={tmp_path / 'c'}", f"cache_dir={cache}", f"corpus_dir={corpus.root}",
                         "tolerances.vocoder.min_snr_db=200", "tolerances.vocoder.accept_torch_floor=false")
    with pytest.raises(ParityError, match="waveform SNR"):
        build_bundle(cfg)
    assert not (tmp_path / "c").exists()


def test_a_calibration_change_decides_the_static_pass_only() -> None:
    """`quantize.calibration=entropy` changes the static INT8 pass's key, not the dynamic ones
    (they share the `quantize` node), so a rebuild reruns only the vocoder's static INT8."""
    static, dynamic = PASSES["quantize_static"], PASSES["quantize_dynamic"]
    base, entropy = QuantizeConfig(), QuantizeConfig(calibration="entropy")
    assert static.key_fields(base) != static.key_fields(entropy)
    assert dynamic.key_fields(base) == dynamic.key_fields(entropy)
    assert dynamic.key_fields(base) != dynamic.key_fields(QuantizeConfig(search_margin=0.5))
    parent_budget = QuantizeConfig(search_reference="parent")  # a static search setting only
    assert static.key_fields(base) != static.key_fields(parent_budget)
    assert dynamic.key_fields(base) == dynamic.key_fields(parent_budget)


def test_keys_are_stable_and_order_free() -> None:
    assert key({"a": 1, "b": [1, 2]}) == key({"b": [1, 2], "a": 1})
    assert key({"a": 1}) != key({"a": 2})


def _record(file: str, sha: str) -> Record:
    return Record(component="vocoder", graph="vocoder", format="onnx", precision="fp32", file=file, sha256=sha,
                  weights="real", stage="export")


def test_candidates_round_trip_and_a_corrupt_entry_is_not_trusted(tmp_path: Path) -> None:
    bundle, other = tmp_path / "bundle", tmp_path / "other"
    bundle.mkdir()
    other.mkdir()
    (bundle / "vocoder_fp32.onnx").write_bytes(b"graph bytes")
    record = _record("vocoder_fp32.onnx", sha256_file(bundle / "vocoder_fp32.onnx"))
    cache = StageCache(tmp_path / "cache")
    assert cache.load_candidate("export", "k1", other) is None
    cache.store_candidate("k1", [record], bundle)
    assert cache.load_candidate("export", "k1", other) == [record]
    assert (other / "vocoder_fp32.onnx").read_bytes() == b"graph bytes"
    assert cache.hits == ["export"] and cache.misses == ["export"]
    # A cached file that no longer matches its sha256 is ignored, and nothing is left behind.
    (tmp_path / "cache" / "passes" / "k1" / "vocoder_fp32.onnx").write_bytes(b"tampered")
    (other / "vocoder_fp32.onnx").unlink()
    assert cache.load_candidate("export", "k1", other) is None
    assert list(other.iterdir()) == []


def test_two_builds_storing_the_same_entry_leave_one_whole_entry(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    payload = b"x" * 2_000_000
    (bundle / "vocoder_fp32.onnx").write_bytes(payload)
    record = _record("vocoder_fp32.onnx", sha256_file(bundle / "vocoder_fp32.onnx"))
    caches = [StageCache(tmp_path / "cache") for _ in range(4)]
    threads = [threading.Thread(target=c.store_candidate, args=("same", [record], bundle)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = sorted(p.name for p in (tmp_path / "cache" / "passes").iterdir())
    assert entries == ["same"], f"temporary entries left behind: {entries}"
    assert (tmp_path / "cache" / "passes" / "same" / "vocoder_fp32.onnx").read_bytes() == payload


def test_judgements_are_written_atomically_and_disabled_without_a_root(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    cache.store("j", {"figures": {"snr": 104.0}, "failures": []})
    assert cache.load("judge", "j") == {"figures": {"snr": 104.0}, "failures": []}
    assert [p.name for p in (tmp_path / "judgements").iterdir()] == ["j.json"]
    off = StageCache(None)
    off.store("j", {"x": 1})
    assert off.load("judge", "j") is None and not off.enabled
