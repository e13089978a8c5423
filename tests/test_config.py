"""conf/ tells the truth: every option of every config group composes, and every key of every section
is a field of the typed schema (a frozen dataclass) the product reads it through, and that field is
read by product code. A key without a field is unknown; a field without a key in any composition, or
one no product code reads, is unread. Sections without a schema yet are listed, by name, in PENDING.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import CONF_DIR, compose_config
from omegaconf import DictConfig, OmegaConf

from voxport.benchmarks.config import BenchConfig
from voxport.errors import ConfigError
from voxport.evaluate.components import COMPONENTS, ValidationConfig
from voxport.export.fp16 import Fp16Config
from voxport.export.onnx import OnnxExportConfig
from voxport.export.openvino import OpenVINOConfig
from voxport.export.tensorrt import TensorRTConfig
from voxport.models.stack import StackConfig
from voxport.pipeline.engine import TimingConfig
from voxport.pipeline.schema import RunConfig, build
from voxport.prune.config import PruneConfig
from voxport.quantize.config import QuantizeConfig
from voxport.runtime.select import TargetConfig
from voxport.runtime.serve.settings import ServeSettings

PACKAGE = Path(__file__).resolve().parents[1]

# Section -> the schema its reader consumes it through. `config` is the top-level scalars.
SCHEMAS: dict[str, type] = {
    "config": RunConfig,
    "target": TargetConfig,
    "serve": ServeSettings,
    "bench": BenchConfig,
    "stack": StackConfig,
    "export": OnnxExportConfig,
    "quantize": QuantizeConfig,
    "fp16": Fp16Config,
    "tensorrt": TensorRTConfig,
    "openvino": OpenVINOConfig,
    "prune": PruneConfig,
    "timing": TimingConfig,
    "validation": ValidationConfig,
}

# Sections (or top-level scalars) still read without a schema: the lead engineer adds theirs here,
# one line each, by moving the name from PENDING to SCHEMAS. Nothing else is skipped.
PENDING = ("gates", "tolerances", "stages")  # keyed by component and precision: checked by the tests below

# Fields of the existing stage schemas that no conf/ node sets, and why: the build or a stage entry
# sets them, or they are defaults a stage entry may override (lead: expose them in conf/ or keep).
SET_ELSEWHERE: dict[str, dict[str, str]] = {
    "quantize": {
        "graph": "stage entry",
        **dict.fromkeys(("op_types", "rank_clips", "rank_seconds", "search_clips", "search_seconds", "engine",
                         "dynamic_op_types"), "default; a stage entry may set it"),
    },
    "fp16": {"graph": "stage entry"},
    "tensorrt": {"graph": "stage entry"},
    "openvino": {"graph": "stage entry"},
    "prune": {"graph": "stage entry", "default_sparsity": "stage entry (the preset's default)"},
}

# Extra overrides an option needs to compose completely (its `???` values).
REQUIRED = {("stack", "mockingbird"): ("stack.speaker_encoder.checkpoint=enc.pt",
                                       "stack.synthesizer.checkpoint=synth.pt",
                                       "stack.vocoder.checkpoint=g_hifigan.pt")}


def _options() -> list[tuple[str, ...]]:
    """Every option of every config group (found in conf/, so a new option is covered too)."""
    found = [()]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            found.append((f"{group.name}={option.stem}", *REQUIRED.get((group.name, option.stem), ())))
    return found


OPTIONS = _options()


@cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_config(*overrides)


def _section(cfg: DictConfig, section: str) -> dict[str, Any]:
    if section == "config":  # the top-level scalars (those still PENDING a schema aside)
        return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                if not isinstance(v, Mapping) and k not in PENDING}
    return OmegaConf.to_container(cfg[section], resolve=True)


def _nested(schema: type) -> dict[str, type]:
    """Fields of `schema` that are themselves schemas (their keys are checked one level down)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])}


def _config_fields(schema: type) -> list[str]:
    # A field with metadata `node` is filled from another section (ServeSettings.target: `target`).
    return [f.name for f in dataclasses.fields(schema) if "node" not in f.metadata]


def unknown_keys(schema: type, data: Mapping[str, Any], where: str) -> list[str]:
    names, nested = set(_config_fields(schema)), _nested(schema)
    out = [f"{where}.{k}" for k in data if k not in names]
    for name, sub in nested.items():
        if isinstance(data.get(name), Mapping):
            out += unknown_keys(sub, data[name], f"{where}.{name}")
    return out


def keyed_fields(schema: type, data: Mapping[str, Any], where: str) -> set[str]:
    """Dotted names of the schema's fields that `data` sets (recursively)."""
    out = set()
    nested = _nested(schema)
    for name in _config_fields(schema):
        if name in data:
            out.add(f"{where}.{name}")
            if name in nested and isinstance(data[name], Mapping):
                out |= keyed_fields(nested[name], data[name], f"{where}.{name}")
    return out


def all_fields(schema: type, where: str) -> dict[str, type]:
    """Dotted field name -> the schema that declares it (recursively)."""
    out = {}
    nested = _nested(schema)
    for name in _config_fields(schema):
        out[f"{where}.{name}"] = schema
        if name in nested:
            out |= all_fields(nested[name], f"{where}.{name}")
    return out


@cache
def product_sources() -> dict[Path, str]:
    """The product's Python files (not tests, not the virtualenv, not the corpus cache)."""
    skip = {"tests", ".venv", ".voxport", "conf"}
    return {p: p.read_text() for p in PACKAGE.rglob("*.py") if not skip & set(p.relative_to(PACKAGE).parts)}


def read_outside_schema(name: str, schema: type) -> bool:
    """Whether any product code reads `name` (`.name` or "name"), outside the schema's own class."""
    pattern = re.compile(rf"\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"']")
    own_file, own_class = Path(inspect.getsourcefile(schema)).resolve(), inspect.getsource(schema)
    for path, text in product_sources().items():
        if path.resolve() == own_file:
            text = text.replace(own_class, "")
        if pattern.search(text):
            return True
    return False


def load(section: str, data: Mapping[str, Any]) -> Any:
    """The section as its reader loads it (its own loader where it has one)."""
    schema = SCHEMAS[section]
    loader = getattr(schema, "from_cfg", None) or getattr(schema, "from_settings", None)
    return loader(data) if loader is not None else build(schema, data, section)


# --------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: o[0] if o else "defaults")
def test_every_section_has_a_schema_or_is_pending(overrides: tuple[str, ...]) -> None:
    cfg = composed(overrides)
    scalars = set(_section(cfg, "config"))
    sections = set(cfg) - scalars
    unchecked = sorted((sections - set(SCHEMAS) - set(PENDING)) | (scalars - set(_config_fields(RunConfig))
                                                                    - set(PENDING)))
    assert not unchecked, f"config sections with no schema and not in PENDING: {unchecked}"


def test_pending_names_exist_and_are_not_also_checked() -> None:
    cfg = composed(())
    assert not set(PENDING) & set(SCHEMAS)
    assert set(PENDING) <= set(cfg), f"stale PENDING entries: {sorted(set(PENDING) - set(cfg))}"


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: o[0] if o else "defaults")
@pytest.mark.parametrize("section", sorted(SCHEMAS))
def test_every_key_is_a_schema_field_and_loads(section: str, overrides: tuple[str, ...]) -> None:
    data = _section(composed(overrides), section)
    assert not unknown_keys(SCHEMAS[section], data, section), "keys no schema field takes (unknown)"
    load(section, data)  # the reader's own loader accepts the composed section


@pytest.mark.parametrize("section", sorted(SCHEMAS))
def test_every_schema_field_has_a_key_and_is_read(section: str) -> None:
    schema = SCHEMAS[section]
    keyed = set().union(*(keyed_fields(schema, _section(composed(o), section), section) for o in OPTIONS))
    elsewhere = {f"{section}.{name}" for name in SET_ELSEWHERE.get(section, {})}
    fields = all_fields(schema, section)
    assert not elsewhere - set(fields), "SET_ELSEWHERE names fields the schema does not have"
    assert not elsewhere & keyed, "SET_ELSEWHERE names fields that conf/ does set"
    without_key = sorted(set(fields) - keyed - elsewhere)
    assert not without_key, f"schema fields no config option sets: {without_key}"
    unread = sorted(f for f in keyed if not read_outside_schema(f.rsplit(".", 1)[1], fields[f]))
    assert not unread, f"keys no product code reads: {unread}"


@pytest.mark.parametrize("section", ["target", "serve", "bench", "stack"])
def test_an_unknown_key_is_one_clear_line(section: str) -> None:
    data = _section(composed(REQUIRED[("stack", "mockingbird")]), section) if section == "stack" else \
        _section(composed(()), section)
    with pytest.raises(ConfigError, match=f"^{section}: unknown setting\\(s\\) bogus") as err:
        load(section, {**data, "bogus": 1})
    assert "\n" not in str(err.value)


def test_removed_keys_stay_removed() -> None:
    cfg = composed(())
    assert "preference" not in cfg.serve and "strict" not in cfg.serve  # target.* drives serve
    assert "providers" not in cfg.target  # the tier picks ONNX Runtime's providers (runtime/select.py)
    assert "int8-dynamic" not in cfg.gates.vocoder  # no stage makes a dynamic-INT8 vocoder


@pytest.mark.parametrize(("target", "preference"), [("cpu", ("cpu", "torch")), ("cuda", ("onnx-cuda", "cpu", "torch")),
                                                     ("tensorrt", ("trt", "onnx-cuda", "cpu", "torch"))])
def test_target_drives_serve_and_the_bench_runtime_row(target: str, preference: tuple[str, ...]) -> None:
    cfg = composed((f"target={target}", "target.strict=true"))
    settings = ServeSettings.from_cfg(cfg.serve, cfg.target)
    assert settings.target.preference == preference and settings.target.strict is True
    bench = BenchConfig.from_cfg(cfg.bench)
    assert bench.e2e.preferences == (("torch",), preference) and bench.e2e.strict is True


# --------------------------------------------------------- sections keyed by component and precision


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: o[0] if o else "defaults")
def test_gates_and_tolerances_are_the_components_own(overrides: tuple[str, ...]) -> None:
    """`gates.<component>.<precision>` names a component and a precision some pass makes of it (a
    gate no artifact can meet is unread), and loads through that component's gate schema;
    `tolerances.<component>` through its FP32 parity schema."""
    from voxport.evaluate.components import EvaluationSettings

    cfg = composed(overrides)
    gates, tolerances = OmegaConf.to_container(cfg.gates), OmegaConf.to_container(cfg.tolerances)
    assert set(gates) == set(COMPONENTS) and set(tolerances) == set(COMPONENTS)
    for name, cls in COMPONENTS.items():
        component = cls(Path("."), None, [], EvaluationSettings(gates=gates, tolerances=tolerances))
        assert set(gates[name]) == set(cls.precisions), f"gates.{name}: precisions no pass makes of it"
        for precision, node in gates[name].items():
            assert set(node) == {f.name for f in dataclasses.fields(cls.Gate)}, f"gates.{name}.{precision}"
            component.gate(precision)
        assert set(tolerances[name]) == {f.name for f in dataclasses.fields(cls.Tolerance)}
        component.tolerance()
        with pytest.raises(ConfigError, match="bogus"):
            cls(Path("."), None, [], EvaluationSettings(gates={name: {cls.precisions[0]: {"bogus": 1}}})).gate(
                cls.precisions[0])


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: o[0] if o else "defaults")
def test_every_stage_entry_plans_and_its_pass_config_loads(overrides: tuple[str, ...]) -> None:
    """Each preset entry names a known pass, component and parent, and its settings (merged with
    the pass's conf node, as the build merges them) load into the pass's typed config."""
    from voxport.pipeline.engine import plan_stages
    from voxport.pipeline.passes import pass_kind

    cfg = composed(overrides)
    for stage in plan_stages(cfg):
        assert stage.parent in ("source", "torch", "onnx") and stage.component in COMPONENTS
        kind = pass_kind(stage.kind)
        settings = {**(OmegaConf.to_container(cfg[kind.settings], resolve=True) if kind.settings else {}),
                    **stage.settings}
        kind.config({**settings, **({"graph": stage.graph} if stage.graph else {})})
        if kind.name != "onnx_export":
            assert stage.parent_precision in COMPONENTS[stage.component].precisions + ("fp32",)


def test_the_session_grid_is_every_combination_named_by_what_varies() -> None:
    from voxport.pipeline.engine import session_variants, variant_label

    default = TimingConfig.from_dict(OmegaConf.to_container(compose_config().timing))
    variants = session_variants(default, build_threads=2)
    assert variants == [{"graph_optimization": "all", "intra_op_threads": 2, "allow_spinning": False},
                        {"graph_optimization": "extended", "intra_op_threads": 2, "allow_spinning": False}]
    assert [variant_label(v, variants) for v in variants] == ["all", "extended"]  # as records always said
    wide = TimingConfig.from_dict({"session_levels": ["all"], "session_threads": [0, 1],
                                   "session_spinning": [False, True]})
    variants = session_variants(wide, build_threads=2)
    assert len(variants) == 4 and {v["intra_op_threads"] for v in variants} == {1, 2}
    labels = [variant_label(v, variants) for v in variants]
    assert labels == ["2t,spin=false", "2t,spin=true", "1t,spin=false", "1t,spin=true"]
    with pytest.raises(ConfigError, match="timing.session_spinning needs at least one value"):
        TimingConfig.from_dict({"session_spinning": []})
