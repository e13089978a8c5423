"""Block-wise distillation of a structurally pruned vocoder (prune/distill.py) on the REAL HiFi-GAN
weights and real calibration speech, with tiny budgets: it really lowers the student's error
against the teacher on crops it never trained on, it is deterministic, it records its curve,
steps and budget (and loudly, a hit time cap), its settings are checked, and they key the cache.
"""

import pytest
import torch

from voxport.errors import ConfigError
from voxport.evaluate import inputs
from voxport.models.vocoder import V1_22K_UNIVERSAL, load_vocoder
from voxport.models.weights import bundled_weights
from voxport.pipeline.passes import pass_kind
from voxport.prune.channels import prune_vocoder
from voxport.prune.config import PruneConfig
from voxport.prune.distill import crop_pool, distill, level_errors, save_curve

TINY = {"crop_frames": 8, "crops": 6, "batch": 3}


@pytest.fixture(scope="module")
def teacher():
    return load_vocoder(bundled_weights("hifigan_v1_universal"), V1_22K_UNIVERSAL)


@pytest.fixture(scope="module")
def clips(corpus, teacher):
    return inputs.speech_clips(corpus, teacher.cfg.mel, 4, 1.0, split="calib")


def pruned(teacher):
    # l1 + uniform: no calibration statistics (OBS's take minutes on the real model); 20 % of the
    # FLOPs from every pair, so every level has something to recover.
    return prune_vocoder(teacher, 0.2, "l1", "uniform")[0]


@pytest.mark.slow
def test_distillation_lowers_the_error_on_crops_it_never_saw(teacher, clips):
    student = pruned(teacher)
    held = crop_pool(clips, 3, 8, seed=99)  # other crops than the training pool (seed 1234)
    before = level_errors(student, teacher, held)
    result = distill(student, teacher, clips, steps=0, seconds=60, seed=1234, **TINY)
    after = level_errors(student, teacher, held)
    assert not result["time_cap_hit"]
    # The output of the last level (what conv_post turns into audio) is what the gate hears.
    assert after[-1] < 0.7 * before[-1], (before, after)
    # A level whose re-fit made the last level's output worse on the pool is put back as it was.
    trained = [e for e in result["levels"] if "error_before" in e]
    assert trained and all(e["output_error_after"] <= e["output_error_before"] for e in trained)


@pytest.mark.slow
def test_distillation_is_deterministic_and_reports_its_curve(teacher, clips, tmp_path):
    runs = []
    for _ in range(2):
        student = pruned(teacher)
        result = distill(student, teacher, clips, steps=2, seconds=60, lr=1e-5, seed=7, **TINY)
        runs.append((student.state_dict(), result))
    (a, ra), (b, rb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra["levels"] == rb["levels"] and ra["steps_done"] == 2 * sum(1 for e in ra["levels"] if "losses" in e
                                                                           and e["losses"])
    assert ra["steps_per_level"] == 2 and ra["seconds_cap"] == 60 and ra["seed"] == 7
    png = save_curve(ra, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))


def test_a_hit_time_cap_is_recorded(teacher, clips, caplog):
    student = pruned(teacher)
    result = distill(student, teacher, clips, steps=1000, seconds=1e-3, seed=1, **TINY)
    assert result["time_cap_hit"] and result["steps_done"] == 0
    assert all("error_before" not in e for e in result["levels"])  # nothing trained past the cap
    assert "TIME CAP HIT" in caplog.text


@pytest.mark.parametrize("bad,needle", [
    ({"distill_steps": -1}, "distill_steps"), ({"distill_seconds": 0}, "distill_seconds"),
    ({"distill_batch": 8, "distill_crops": 4}, "distill_batch"), ({"distill_lr": "fast"}, "distill_lr"),
    ({"distill": "yes"}, "prune.distill"), ({"distill_crop_frames": 2.5}, "distill_crop_frames"),
])
def test_bad_distillation_settings_are_named(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        PruneConfig(**bad)
    with pytest.raises(ConfigError, match="distill"):
        distill(torch.nn.Module(), torch.nn.Module(), [], steps=1, seconds=-1)


def test_every_distillation_setting_keys_the_stage_cache():
    kind = pass_kind("prune_structured")
    base = kind.key_fields(kind.config({"distill": True}))
    for name, value in (("distill", False), ("distill_steps", 3), ("distill_seconds", 60.0), ("distill_lr", 1e-4),
                        ("distill_clips", 4), ("distill_crops", 8), ("distill_crop_frames", 16),
                        ("distill_batch", 2), ("distill_damp", 1e-2)):
        assert kind.key_fields(kind.config({"distill": True, name: value})) != base, name


@pytest.mark.slow
def test_the_structured_pass_records_the_distillation_and_its_curve(teacher, corpus, tmp_path):
    """The pass's draft record (before judging: l1 pruning fails the gate by design here) carries the
    steps, budget and curve, and the PNG lies beside the artifact, named as a cache sidecar."""
    from conftest import stage_context

    from voxport.models import registry
    from voxport.models.checkpoint import sha256_file
    from voxport.pipeline.passes import PassContext
    from voxport.pipeline.records import Record

    path = registry.save_torch_artifact(teacher, tmp_path / "vocoder_fp32.pt")
    source = Record(component="vocoder", graph="vocoder", format="torch", precision="fp32", file=path.name,
                    sha256=sha256_file(path), weights="real", stage="source",
                    model=registry.describe("hifigan", teacher.cfg))
    ctx = stage_context(tmp_path, corpus, [source], {})
    kind = pass_kind("prune_structured")
    config = kind.config({"sparsity": 0.2, "importance": "l1", "allocation": "uniform", "calibration_clips": 2,
                          "calibration_seconds": 1.0, "distill": True, "distill_steps": 1, "distill_clips": 2,
                          "distill_crops": 4, "distill_crop_frames": 8, "distill_batch": 2, "graph": "vocoder"})
    candidate = kind.transform()(source, config, PassContext(tmp_path, ctx.component("vocoder"), ctx.records))
    draft = candidate.records[0]
    assert draft.file == "vocoder_pruned_l1_structured_20_distilled.pt"
    record = draft.config["pruning"]["distill"]
    assert record["steps_per_level"] == 1 and record["seconds_cap"] == 600.0 and record["time_cap_hit"] is False
    assert record["steps_done"] == sum(len(e["losses"]) for e in record["levels"]) >= 1
    assert draft.config["sidecars"] == [record["curve_png"]]
    assert record["curve_png"] == "vocoder_pruned_l1_structured_20_distilled.distill.png"
    assert (tmp_path / record["curve_png"]).read_bytes()[:4] == b"\x89PNG"
    assert "distilled" in candidate.notes["label"]


def test_sidecars_travel_with_a_cached_candidate_and_must_be_plain_names(tmp_path):
    from voxport.models.checkpoint import sha256_file
    from voxport.pipeline.cache import StageCache
    from voxport.pipeline.records import Record

    built, other = tmp_path / "built", tmp_path / "other"
    built.mkdir()
    other.mkdir()
    (built / "m.pt").write_bytes(b"model")
    (built / "m.distill.png").write_bytes(b"\x89PNG curve")
    record = Record(component="vocoder", graph="vocoder", format="torch", precision="fp32", file="m.pt",
                    sha256=sha256_file(built / "m.pt"), weights="real", stage="prune",
                    config={"sidecars": ["m.distill.png"]})
    cache = StageCache(tmp_path / "cache")
    cache.store_candidate("k" * 64, [record], built)
    assert cache.load_candidate("prune", "k" * 64, other) is not None
    assert (other / "m.distill.png").read_bytes() == b"\x89PNG curve"
    escaping = record.replace(config={"sidecars": ["../outside.png"]})
    cache.store_candidate("j" * 64, [escaping], built)  # refused: nothing is stored (a miss later)
    assert cache.load_candidate("prune", "j" * 64, other) is None and not (tmp_path / "outside.png").exists()


@pytest.mark.slow
def test_a_distilled_candidate_that_fails_its_gate_leaves_nothing_behind(teacher, corpus, tmp_path):
    """Through the engine: l1 pruning of 20 % fails the listener gate by design; the model, its record
    and its loss-curve PNG (a sidecar) are all gone afterwards."""
    from conftest import run_stage, stage_context

    from voxport.errors import GateError
    from voxport.models import registry
    from voxport.models.checkpoint import sha256_file
    from voxport.pipeline.records import Record

    path = registry.save_torch_artifact(teacher, tmp_path / "vocoder_fp32.pt")
    source = Record(component="vocoder", graph="vocoder", format="torch", precision="fp32", file=path.name,
                    sha256=sha256_file(path), weights="real", stage="source",
                    model=registry.describe("hifigan", teacher.cfg))
    gates = {"vocoder": {"fp32": {"max_log_mel_increase_db": 0.3, "max_pesq_drop": 0.1, "require_speedup": False}}}
    ctx = stage_context(tmp_path, corpus, [source], gates, gate_seconds=1.0, timing_seconds=0.5)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(GateError):
        run_stage(ctx, "prune_structured", source, {
            "sparsity": 0.2, "importance": "l1", "allocation": "uniform", "calibration_clips": 2,
            "calibration_seconds": 1.0, "distill": True, "distill_steps": 1, "distill_clips": 2, "distill_crops": 4,
            "distill_crop_frames": 8, "distill_batch": 2, "graph": "vocoder"})
    assert sorted(p.name for p in tmp_path.iterdir()) == before
