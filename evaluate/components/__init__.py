"""One class per component: the only code that knows what is specific to a speaker encoder, a
synthesizer or a vocoder when an artifact is judged, calibrated or timed."""

from __future__ import annotations

from voxport.errors import ConfigError
from voxport.evaluate.components.base import Component, EvaluationSettings, SearchJudge, TimingFeed, ValidationConfig
from voxport.evaluate.components.speaker_encoder import SpeakerEncoder
from voxport.evaluate.components.synthesizer import Synthesizer
from voxport.evaluate.components.vocoder import Vocoder

COMPONENTS: dict[str, type[Component]] = {cls.name: cls for cls in (SpeakerEncoder, Synthesizer, Vocoder)}


def component_class(name: str) -> type[Component]:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise ConfigError(f"unknown component '{name}' (known: {', '.join(COMPONENTS)})") from None


__all__ = ["COMPONENTS", "Component", "EvaluationSettings", "SearchJudge", "SpeakerEncoder", "Synthesizer",
           "TimingFeed", "ValidationConfig", "Vocoder", "component_class"]
