"""What every component class provides: its reference, its inputs, its judgement, its timing feed.

A component (speaker encoder, synthesizer, vocoder) is the one place that knows what is specific
to it. The engine and the passes never ask "which component is this?": they call these methods.
Inputs are chosen here, once per build, and memoised, so a gate, a search and a timing run of the
same build see the same real speech and the same texts.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from voxport.errors import AudioError, ConfigError
from voxport.evaluate.corpus import Corpus, CorpusItem
from voxport.models import registry
from voxport.models.graph import GraphSpec
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Runner

log = logging.getLogger(__name__)

Judgement = tuple[dict[str, Any], list[str]]  # (every figure, the failures in words)


@dataclass(frozen=True)
class ValidationConfig:
    """conf `validation`: the real inputs FP32 exports are compared on, and the held-out gate length."""

    vocoder_clips: int = 3
    encoder_clips: int = 3
    max_clip_seconds: float = 3.0
    synthesizer_steps: int = 30
    gate_seconds: float = 3.0  # held-out recordings of the vocoder's listener gate are cropped to this
    texts: tuple[str, ...] = ("Voice cloning turns a few seconds of speech into a new voice.",)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ValidationConfig:
        from voxport.pipeline.schema import build

        return build(cls, data or {}, "validation")


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything judging needs from the config, typed once by the engine."""

    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tolerances: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # conf `tolerances`
    gates: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)  # conf `gates`
    seed: int = 1234
    threads: int = 0


@dataclass(frozen=True)
class TimingFeed:
    """A real input to time a graph on; `wrap` turns a one-call runner into what one timed call is
    (the decoder step is timed over a sequence of real steps)."""

    feed: Mapping[str, np.ndarray]
    audio_seconds: float
    wrap: Callable[[Runner], Runner] = staticmethod(lambda run: run)  # type: ignore[assignment]
    describe: str = ""


class SearchJudge(abc.ABC):
    """The gate a mixed-precision search consults on CALIBRATION inputs, tightened by `margin`."""

    error_name: str = ""
    steps: int = 1  # time steps one call runs a recurrent layer for (weights each layer's compute)

    @abc.abstractmethod
    def evaluate(self, run_test: Runner) -> Judgement:
        """Figures and failures of a trial artifact against the FP32 reference."""

    @abc.abstractmethod
    def error(self, figures: Mapping[str, Any]) -> float:
        """One number per trial, larger = worse (ranks layers quantized alone)."""


def gate_fields(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """A gate / tolerance dataclass from its config node; unknown keys are named, never dropped."""
    from voxport.pipeline.schema import build

    return build(cls, data, where)


class Component(abc.ABC):
    """Base of the three component classes; see the module docstring."""

    name: ClassVar[str]
    graphs: ClassVar[tuple[str, ...]]
    precisions: ClassVar[tuple[str, ...]]  # of lossy artifacts passes make of it (conf gates.<name>.<precision>)
    Gate: ClassVar[type]  # conf gates.<name>.<precision>
    Tolerance: ClassVar[type]  # conf tolerances.<name>

    def __init__(self, bundle_dir: Path, corpus: Corpus, records: list[Record], settings: EvaluationSettings,
                 memo: dict[str, Any] | None = None) -> None:
        self.bundle_dir, self.corpus, self.records, self.settings = Path(bundle_dir), corpus, records, settings
        self.memo: dict[str, Any] = memo if memo is not None else {}

    # -- the reference ---------------------------------------------------------------------------

    @property
    def source(self) -> Record:
        """The PyTorch FP32 original: the reference every artifact of this component is judged by."""
        for r in self.records:
            if r.component == self.name and r.stage == "source":
                return r
        raise ConfigError(f"no PyTorch source record for '{self.name}' in this build")

    def specs_of(self, record: Record, graph_form: dict[str, Any] | None = None) -> dict[str, GraphSpec]:
        """The graphs of a torch artifact of this component, rebuilt from its file (memoised), in
        the form an export rewrote them to (`graph_form` of the export's record), if any."""
        key = f"specs:{record.sha256}:{sorted((graph_form or {}).items())}"
        if key not in self.memo:
            module = registry.load_torch_artifact(self.bundle_dir / record.file, record.model)
            model = {**record.model, "graph_form": graph_form} if graph_form else record.model
            self.memo[key] = registry.graph_specs(module, model)
        return self.memo[key]

    def reference_specs(self) -> dict[str, GraphSpec]:
        return self.specs_of(self.source)

    def reference_runner(self, graph: str) -> Runner:
        from voxport.export.onnx import torch_runner

        key = f"runner:{self.source.sha256}:{graph}"
        if key not in self.memo:
            self.memo[key] = torch_runner(self.reference_specs()[graph])
        return self.memo[key]

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """Memoise `make()` for this build (inputs are chosen once and reused by every consumer)."""
        key = f"{self.name}:{key}"
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    # -- configuration ---------------------------------------------------------------------------

    def gate(self, precision: str) -> Any:
        """The listener-side gate for artifacts of `precision` (conf gates.<component>.<precision>)."""
        try:
            node = self.settings.gates[self.name][precision]
        except KeyError:
            raise ConfigError(f"no gate configured for {self.name} {precision} "
                              f"(conf gates.{self.name}.{precision})") from None
        return gate_fields(self.Gate, node, f"gates.{self.name}.{precision}")

    def tolerance(self) -> Any:
        return gate_fields(self.Tolerance, self.settings.tolerances.get(self.name) or {}, f"tolerances.{self.name}")

    # -- judgement -------------------------------------------------------------------------------

    @abc.abstractmethod
    def parity(self, runners: Mapping[str, Runner], reference: Record) -> Judgement:
        """FP32 parity of an exact transform (an ONNX export) against its torch `reference`."""

    @abc.abstractmethod
    def listen(self, runners: Mapping[str, Runner], precision: str) -> Judgement:
        """The listener-side gate of a lossy artifact (graphs under test in `runners`, the other
        graphs FP32) against the ORIGINAL recording, relative to the PyTorch FP32 original."""

    @abc.abstractmethod
    def search_judge(self, graph: str, precision: str, margin: float) -> SearchJudge:
        """The gate a mixed-precision search of `graph` consults on calibration inputs."""

    @abc.abstractmethod
    def timing_feed(self, graph: str, seconds: float) -> TimingFeed:
        """The real input `graph` is timed on (`seconds` of speech where the graph takes audio)."""

    @abc.abstractmethod
    def drive(self, graph: str, run: Runner, n: int, seconds: float, steps: int) -> dict[str, Any]:
        """Run `graph` (as `run`) on real CALIBRATION inputs (a reference run); what it ran."""

    @abc.abstractmethod
    def axis_lengths(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Observed lengths per dynamic axis label of this component's graphs, and their source."""

    def half_precision_proxy(self, graph: str, seconds: float) -> dict[str, Any]:
        """Fidelity of torch `.half()` on CPU vs FP32 on a short real input: a better proxy of GPU
        FP16 arithmetic than ONNX Runtime CPU, which computes most FP16 nodes in FP32 behind
        inserted Casts. CPU FP16 kernels are reference code (50-70x slower), hence short inputs."""
        return {}

    def headline(self, figures: Mapping[str, Any]) -> str:
        """The figures a log line shows for a judged artifact."""
        return ""

    def torch_scope(self, graph: str) -> str:
        """The submodule of the PyTorch model that holds `graph`'s layers ("" = the whole model)."""
        return ""

    # -- shared helpers --------------------------------------------------------------------------

    def voices(self, split: str, n: int, min_seconds: float = 0.0) -> list[CorpusItem]:
        """`n` recordings of `split` spread over speakers (round robin, sorted by id)."""
        from voxport.evaluate.inputs import _round_robin

        items = [i for i in self.corpus.items(split=split) if i.duration_s >= min_seconds]
        return _round_robin(items, n)

    def embeddings(self, items: Sequence[CorpusItem]) -> list[np.ndarray]:
        """Speaker embeddings of real recordings with the build's own PyTorch speaker encoder."""
        from voxport.models import speaker_encoder as se

        source = next((r for r in self.records if r.component == "speaker_encoder" and r.stage == "source"), None)
        if source is None:
            raise ConfigError("the synthesizer's gate needs the speaker encoder's PyTorch original in the build")
        encoder = self.cached(f"encoder:{source.sha256}", lambda: registry.load_torch_artifact(
            self.bundle_dir / source.file, source.model))
        out = []
        for item in items:
            try:
                out.append(se.embed_reference(encoder, self.corpus.audio(item, encoder.cfg.sample_rate),
                                              encoder.cfg.sample_rate, encoder.cfg))
            except AudioError as exc:
                log.info("%s: %s left out (%s)", self.name, item.id, exc)
        return out
