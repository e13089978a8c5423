"""The voxport command line on real audio: vocode reports its distance, clone refuses bad references."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxport.cli import main
from voxport.runtime.doctor import GRAPHS


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("build", "clone", "vocode", "doctor", "corpus"):
        assert command in out
    assert main(["no-such-command"]) == 2


@pytest.mark.slow  # 2-3 s: the fast tier keeps its siblings
def test_vocode_real_speech_reports_mr_stft(bundle: Path, corpus, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    item = next(i for i in corpus.items(split="eval") if i.source != "espeak-ng")
    out = tmp_path / "copy.wav"
    rc = main(["vocode", "--wav", str(corpus.root / item.files["16000"]), "--out", str(out),
               "--bundle", str(bundle)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MR-STFT distance to input" in text and "vocoder_fp32.onnx" in text
    wav, sr = sf.read(out)
    assert sr == 22050 and len(wav) > 0.5 * sr
    distance = float(text.split("MR-STFT distance to input ")[1].split(",")[0])
    assert 0.0 < distance < 3.0


@pytest.mark.parametrize("kind", ["empty", "silent", "short"])
def test_clone_refuses_unusable_reference(bundle: Path, corpus, tmp_path: Path, kind: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ref = tmp_path / f"{kind}.wav"
    if kind == "empty":
        sf.write(ref, np.zeros(0, dtype=np.float32), 16000)
    elif kind == "silent":
        sf.write(ref, np.zeros(3 * 16000, dtype=np.float32), 16000)
    else:  # 0.4 s of real speech: too little voiced audio for the encoder
        item = next(i for i in corpus.items(split="eval") if i.speaker == "allison")
        sf.write(ref, corpus.audio(item, 16000)[4000:4000 + 6400], 16000)
    out = tmp_path / "out.wav"
    rc = main(["clone", "--ref", str(ref), "--text", "Hello.", "--out", str(out), "--bundle", str(bundle)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("voxport clone: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_clone_writes_audio_and_says_weights_are_seeded(bundle: Path, corpus, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    item = next(i for i in corpus.items(split="eval") if i.speaker == "allison")
    out = tmp_path / "clone.wav"
    rc = main(["clone", "--ref", str(corpus.root / item.files["16000"]), "--text", "Hi there.",
               "--out", str(out), "--bundle", str(bundle), "--max-steps", "8"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "seeded" in text and "synthesizer/decoder_step" in text
    wav, sr = sf.read(out)
    assert sr == 22050 and len(wav) > 0


def test_build_log_drops_onnxruntime_quantizer_chatter_but_not_its_warnings() -> None:
    import logging

    from voxport.cli import _drop_quantizer_chatter

    def record(name: str, level: int, path: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, "Quantization parameters for tensor x not specified", None, None)

    ort_file = "/venv/lib/python3.11/site-packages/onnxruntime/quantization/base_quantizer.py"
    assert not _drop_quantizer_chatter(record("root", logging.INFO, ort_file))
    assert _drop_quantizer_chatter(record("root", logging.WARNING, ort_file))
    assert _drop_quantizer_chatter(record("root", logging.INFO, "/work/voxport/build.py"))
    assert _drop_quantizer_chatter(record("voxport.quantize.static", logging.INFO, "/x/voxport/quantize/static.py"))


# ------------------------------------------------------- selection from the composed config's target


def _doctor_graph_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["doctor", *argv]) == 0
    lines = [x.strip() for x in capsys.readouterr().out.splitlines()]
    graphs = [x for x in lines if x.split(":")[0] in {f"{c}/{g}" for c, g in GRAPHS}]
    assert len(graphs) == len(GRAPHS)
    return graphs


def test_doctor_target_preference_override_serves_pytorch_everywhere(bundle: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for line in _doctor_graph_lines(["--bundle", str(bundle), "target.preference=[torch]"], capsys):
        assert "_fp32.pt (" in line and ", torch) <- PyTorch FP32 original" in line, line


def test_doctor_defaults_to_the_cpu_targets_preference(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "(preference: cpu > torch)" in out  # conf/target/cpu.yaml
    for line in _doctor_graph_lines(["--bundle", str(bundle)], capsys):
        assert "_fp32.onnx (" in line and ", cpu) <- onnx fp32 on CPU" in line, line


def test_prefer_flag_is_the_override_shortcut(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    by_flag = _doctor_graph_lines(["--bundle", str(bundle), "--prefer", "torch"], capsys)
    assert by_flag == _doctor_graph_lines(["--bundle", str(bundle), "target.preference=[torch]"], capsys)
    assert by_flag == _doctor_graph_lines(["target.preference=[onnx]", "--bundle", str(bundle), "--prefer", "torch"],
                                          capsys)  # the flag wins, overrides and flags intermix
    assert main(["doctor", "--bundle", str(bundle), "--strict", "target.preference=[trt,torch]"]) == 0
    out = capsys.readouterr().out
    assert "(preference: trt > torch, strict)" in out and "strict mode and first preference 'trt'" in out


@pytest.mark.parametrize("command", ["doctor", "vocode", "clone"])
@pytest.mark.parametrize(("override", "message"), [
    ("target.bogus=1", "unknown config key 'target.bogus'"),
    ("target=gpu", "Could not find 'target/gpu' (options: cpu, cuda, tensorrt)"),
    ("+target.bogus=1", "target: unknown setting(s) bogus"),
    ("target.preference=[gpu]", "target.preference must name tiers of"),
])
def test_a_bad_override_fails_in_one_line(command: str, override: str, message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    flags = {"doctor": [], "vocode": ["--wav", "in.wav", "--out", str(tmp_path / "o.wav")],
             "clone": ["--ref", "in.wav", "--text", "hi", "--out", str(tmp_path / "o.wav")]}[command]
    assert main([command, *flags, override]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith(f"voxport {command}: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.wav").exists()
