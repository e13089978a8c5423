"""The pass registry: unknown kinds are named, every kind has a typed config, no pass leaks global
torch state; side-by-side timing is interleaved and rotated."""

import dataclasses

import pytest
import torch

from voxport.errors import ConfigError
from voxport.pipeline.passes import PASSES, isolated, pass_kind


def _torch_state() -> tuple:
    return torch.get_num_threads(), torch.is_grad_enabled(), torch.random.get_rng_state().clone()


def meddle(parent, cfg, ctx):
    """A pass that does what real passes do to global state: draws numbers, pins threads, trains."""
    torch.manual_seed(99)
    torch.randn(1000)
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
    torch.set_grad_enabled(not torch.is_grad_enabled())
    if cfg.get("explode"):
        raise RuntimeError("stage failed")
    return parent


@pytest.mark.parametrize("explode", [False, True], ids=["passing", "failing"])
def test_passes_leave_rng_threads_and_grad_mode_unchanged(explode: bool) -> None:
    torch.manual_seed(5)
    before = _torch_state()
    run = isolated(meddle)  # what every pass's transform runs inside (PassKind.transform)
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
        pass_kind("quantize_statik")


def test_every_pass_kind_has_a_typed_config_and_a_transform() -> None:
    """One registry: each kind's module defines CONFIG (a dataclass, conf defaults) and transform;
    the settings node it reads exists in conf/, and an unknown key is refused by name."""
    from conftest import compose_config

    cfg = compose_config()
    for kind in PASSES.values():
        module = kind.load()
        assert callable(module.transform) and dataclasses.is_dataclass(module.CONFIG), kind.name
        settings = dict(cfg[kind.settings]) if kind.settings else {}
        assert dataclasses.is_dataclass(kind.config(settings)), kind.name
        with pytest.raises(ConfigError, match="typo_key"):
            kind.config({**settings, "typo_key": 1})
    assert PASSES["tensorrt"].requires == ("cuda", "tensorrt") and PASSES["onnx_export"].exact


class _FakeClock:
    """A perf_counter that moves only when a runner "works": the timing logic, without the wall clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_side_by_side_times_short_workloads_for_more_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from voxport.evaluate import timing
    from voxport.evaluate.timing import side_by_side

    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)  # side_by_side reads time.perf_counter()
    cost = {"a": 1 / 64, "b": 1 / 16}  # seconds per call; binary fractions, so the clock's sums are exact
    calls = {"a": 0, "b": 0}

    def runner(name: str):
        def run(feed):
            calls[name] += 1
            clock.now += cost[name]
        return run

    runners = {"a": runner("a"), "b": runner("b")}
    fixed = side_by_side(runners, {}, repeats=3, warmup=1)
    assert [t["runs"] for t in fixed.values()] == [3, 3] and calls == {"a": 4, "b": 4}
    assert {name: t["median_s"] for name, t in fixed.items()} == cost  # each runner timed alone
    # The slowest runner sets the rounds: ceil(0.5 s / (1/16 s)) = 8, the same for every runner (interleaved).
    adaptive = side_by_side(runners, {}, repeats=3, warmup=1, min_seconds=0.5)
    assert [t["runs"] for t in adaptive.values()] == [8, 8]
    assert {name: (t["min_s"], t["max_s"]) for name, t in adaptive.items()} == {n: (c, c) for n, c in cost.items()}
    # Never fewer rounds than `repeats`, never more than `max_repeats`.
    assert [t["runs"] for t in side_by_side(runners, {}, repeats=12, min_seconds=0.5).values()] == [12, 12]
    capped = side_by_side(runners, {}, repeats=3, min_seconds=100.0, max_repeats=10)
    assert [t["runs"] for t in capped.values()] == [10, 10]


def test_derived_artifact_names_never_overwrite_the_parent() -> None:
    from voxport.pipeline.passes import artifact_name

    assert artifact_name("vocoder_fp32.onnx", "int8_static") == "vocoder_int8_static.onnx"
    assert artifact_name("speaker_encoder_fp32.onnx", "int8_dynamic") == "speaker_encoder_int8_dynamic.onnx"
    assert artifact_name("vocoder_fp32.pt", "bf16") == "vocoder_bf16.pt"
    chained = artifact_name("vocoder_pruned_obs_structured_10.onnx", "int8_static")
    assert chained == "vocoder_pruned_obs_structured_10_int8_static.onnx"


def test_side_by_side_rotates_the_order_so_no_runner_always_follows_the_same_one() -> None:
    from voxport.evaluate.timing import side_by_side

    calls: list[str] = []
    runners = {name: (lambda feed, name=name: calls.append(name)) for name in ("torch", "int8", "fp32")}
    side_by_side(runners, {}, repeats=3, warmup=0)
    rounds = [calls[i:i + 3] for i in range(0, 9, 3)]
    assert rounds == [["torch", "int8", "fp32"], ["int8", "fp32", "torch"], ["fp32", "torch", "int8"]]
