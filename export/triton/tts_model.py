"""The `voxport_tts` Python-backend model of a Triton package: model.py, its settings and the shipped front end.

model.py itself is `python_model/model.py` (copied as is); this writes its `config.pbtxt` (inputs and
outputs a client sees, decoupled) and `voxport_tts.json` (the bundle's synthesizer config, sample
rate, hop and the names of the graph models it calls).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxport.export.triton import configs, frontend
from voxport.export.triton.configs import Sym
from voxport.export.triton.settings import PackageConfig
from voxport.pipeline.records import Record

if TYPE_CHECKING:
    from voxport.export.triton.repository import PackagedModel

TTS_MODEL = "voxport_tts"
# Partials (1.6 s windows at 50 % overlap) voxport_tts embeds per request: about 50 s of reference speech.
MAX_SPEAKER_PARTIALS = 64
_PYTHON_MODEL_DIR = Path(__file__).resolve().parent / "python_model"


def write_tts_model(records: Sequence[Record], models: Sequence[PackagedModel], cfg: PackageConfig,
                    root: Path) -> dict[str, Any]:
    """The Python-backend model: model.py, its settings and the shipped front end."""
    from voxport.models.synthesizer_config import SynthesizerConfig
    from voxport.runtime.streaming import StreamConfig

    sources = {r.component: r for r in records if r.stage == "source"}
    synth = SynthesizerConfig.from_dict(sources["synthesizer"].model["config"])
    mel = sources["vocoder"].contract["mel"]
    by_name = {m.name: m for m in models}
    encoder = by_name["speaker_encoder"]
    version_dir = root / TTS_MODEL / "1"
    version_dir.mkdir(parents=True)
    shutil.copyfile(_PYTHON_MODEL_DIR / "model.py", version_dir / "model.py")
    shipped = frontend.write_frontend(version_dir)
    settings = {
        "synthesizer": synth.to_dict(), "sample_rate": int(mel["sample_rate"]), "hop_length": int(mel["hop_length"]),
        "stream": dataclasses.asdict(StreamConfig()),
        "speaker_encoder_max_batch": int(encoder.config["max_batch_size"]) or 1 << 16,
        "max_text_chars": cfg.max_text_chars,
        "max_speaker_partials": MAX_SPEAKER_PARTIALS,
        "models": {m.record.graph: m.name for m in models},  # graph (as model.py calls it) -> Triton model
        "shipped_frontend": shipped,
    }
    (version_dir / "voxport_tts.json").write_text(json.dumps(settings, indent=2) + "\n")
    mels_input = next(i for i in encoder.config["input"] if i["name"] == "mels")
    mels_dims = [-1, *mels_input["dims"]] if encoder.config["max_batch_size"] else list(mels_input["dims"])

    def entry(name: str, data_type: str, dims: list[int], optional: bool = True) -> dict[str, Any]:
        return {"name": name, "data_type": Sym(data_type), "dims": dims, **({"optional": True} if optional else {})}

    config = {
        "name": TTS_MODEL, "backend": "python", "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [entry("TEXT", "TYPE_STRING", [1], optional=False),
                  entry("EMBEDDING", "TYPE_FP32", [synth.speaker_embedding_dim]),
                  entry("SPEAKER_MELS", "TYPE_FP32", mels_dims),
                  entry("SEED", "TYPE_INT64", [1]), entry("STYLE_IDX", "TYPE_INT64", [1]),
                  entry("MAX_DECODER_STEPS", "TYPE_INT64", [1]), entry("MIN_STOP_TOKEN", "TYPE_FP32", [1]),
                  entry("STREAM", "TYPE_BOOL", [1])],
        "output": [{"name": "AUDIO", "data_type": Sym("TYPE_FP32"), "dims": [-1]},
                   {"name": "SAMPLE_RATE", "data_type": Sym("TYPE_INT32"), "dims": [1]}],
        "instance_group": configs.instance_group("KIND_CPU", cfg.instances),
    }
    header = ["voxport voxport_tts: text + speaker embedding (or the speaker encoder's partial mels) -> audio",
              "BLS calls to the graph models of this repository; decoupled: STREAM=true sends audio chunks"]
    (root / TTS_MODEL / "config.pbtxt").write_text(configs.to_pbtxt(config, header))
    return config
