"""The stage registry: unknown kinds are named, and no stage leaks global torch state."""

import pytest
import torch

from voxport.errors import ConfigError
from voxport.pipeline.passes import _STAGES, register, stage


def _torch_state() -> tuple:
    return torch.get_num_threads(), torch.is_grad_enabled(), torch.random.get_rng_state().clone()


@pytest.fixture
def meddling_stage():
    """A stage that does what real stages do to global state: draws numbers, pins threads, trains."""
    @register("test_meddler")
    def meddle(parent, cfg, ctx):
        torch.manual_seed(99)
        torch.randn(1000)
        torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
        torch.set_grad_enabled(not torch.is_grad_enabled())
        if cfg.get("explode"):
            raise RuntimeError("stage failed")
        return parent

    yield "test_meddler"
    _STAGES.pop("test_meddler", None)


@pytest.mark.parametrize("explode", [False, True], ids=["passing", "failing"])
def test_stages_leave_rng_threads_and_grad_mode_unchanged(meddling_stage: str, explode: bool) -> None:
    torch.manual_seed(5)
    before = _torch_state()
    run = stage(meddling_stage)
    if explode:
        with pytest.raises(RuntimeError, match="stage failed"):
            run("parent", {"explode": True}, None)
    else:
        assert run("parent", {}, None) == "parent"
    after = _torch_state()
    assert after[:2] == before[:2]
    assert torch.equal(after[2], before[2])
    # The caller's random stream continues as if no stage had run.
    expected = torch.Generator().manual_seed(5)
    assert torch.equal(torch.randn(4), torch.randn(4, generator=expected))


def test_unknown_stage_kind_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown stage 'quantize_statik'.*quantize_static"):
        stage("quantize_statik")


def test_side_by_side_times_short_workloads_for_more_rounds() -> None:
    import time

    from voxport.evaluate.quality import side_by_side

    calls = {"a": 0, "b": 0}

    def runner(name: str):
        def run(feed):
            calls[name] += 1
            time.sleep(0.01)
        return run

    runners = {"a": runner("a"), "b": runner("b")}
    fixed = side_by_side(runners, {}, repeats=3, warmup=1)
    assert [t["runs"] for t in fixed.values()] == [3, 3] and calls == {"a": 4, "b": 4}
    adaptive = side_by_side(runners, {}, repeats=3, warmup=1, min_seconds=0.2)
    runs = {t["runs"] for t in adaptive.values()}
    assert len(runs) == 1 and 3 < runs.pop() <= 20  # interleaved: every runner the same rounds


def test_derived_artifact_names_never_overwrite_the_parent() -> None:
    from voxport.pipeline.passes import artifact_name

    assert artifact_name("vocoder_fp32.onnx", "int8_static") == "vocoder_int8_static.onnx"
    assert artifact_name("speaker_encoder_fp32.onnx", "int8_dynamic") == "speaker_encoder_int8_dynamic.onnx"
    assert artifact_name("vocoder_fp32.pt", "bf16") == "vocoder_bf16.pt"
    chained = artifact_name("vocoder_pruned_obs_structured_10.onnx", "int8_static")
    assert chained == "vocoder_pruned_obs_structured_10_int8_static.onnx"


def test_side_by_side_rotates_the_order_so_no_runner_always_follows_the_same_one() -> None:
    from voxport.evaluate.quality import side_by_side

    calls: list[str] = []
    runners = {name: (lambda feed, name=name: calls.append(name)) for name in ("torch", "int8", "fp32")}
    side_by_side(runners, {}, repeats=3, warmup=0)
    rounds = [calls[i:i + 3] for i in range(0, 9, 3)]
    assert rounds == [["torch", "int8", "fp32"], ["int8", "fp32", "torch"], ["fp32", "torch", "int8"]]
