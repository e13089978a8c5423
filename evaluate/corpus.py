"""A small corpus of REAL speech, assembled offline from Debian main, for tests and calibration.

Sources (see /work/shared/reference/feasibility.md section 5):
- `asterisk-core-sounds-en-wav`: Allison Smith, one female US speaker, 8 kHz, CC-BY-SA-3.0.
- `codec2-examples`: several recorded speakers, 8 kHz (two files at 16 kHz), LGPL-2.1. Speaker
  identities are not documented, so each file stem is its own speaker label; that two stems are
  different people is likely, not guaranteed. Left out: `all.wav` (a concatenation of hts1a,
  hts2a, morig, forig, ve9qrp, cq_ref, kristoff, vk5qi, found by cross-correlation),
  f2400 / m2400 (forig / morig coded at 2400 bit/s: same utterance, log-mel correlation 0.94-0.97)
  and david4 / vk2tpm_004, which are not speech but off-air FreeDV OFDM modem recordings (modes
  2020 and 700D; codec2's acquisition tests demodulate them).
- `alsa-utils`: the 8 spoken channel names of speaker-test, 48 kHz, GPL-2 (Noise.wav is skipped).
- `espeak-ng` (must be installed): four English voice variants and Mandarin (`cmn`). Synthetic,
  so it is labelled by voice and never used where a real same-speaker pair is needed.

Every clip is stored as 16-bit mono WAV at 16 kHz and 22.05 kHz. `native_sample_rate` in the
manifest says how wide the band really is: 8 kHz recordings have nothing above 4 kHz.

Speaker separation, measured once with Resemblyzer's pretrained encoder on the 16 kHz files:
same-speaker cosine >= 0.82 for allison, codec2-ve9qrp, codec2-vk5qi, codec2-speech_orig_16k
(alsa's 1.4 s clips: >= 0.68), cross-speaker <= 0.73 among all real speakers. The espeak voices
are not separable (cross-voice up to 0.96): use them as text/language material, not identities.
Build with `python -m voxport.evaluate.corpus [--out DIR] [--force]`; load with `load_corpus()`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from voxport.errors import CorpusError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SAMPLE_RATES = (16000, 22050)
SPLITS = ("calib", "eval")
LICENSES = {"asterisk-core-sounds-en-wav": "CC-BY-SA-3.0", "codec2-examples": "LGPL-2.1",
            "alsa-utils": "GPL-2", "espeak-ng": "GPL-3"}
_ASTERISK_DIR = "usr/share/asterisk/sounds/en_US_f_Allison"
_ASTERISK_COUNT = 12
_CODEC2_DIR = "usr/share/codec2"
# Short single-utterance files (one clip each) and long recordings (cut at pauses into segments).
# f2400 / m2400 are left out: they are forig / morig (same utterances) passed through the codec.
_CODEC2_SHORT = ("big_dog", "cross", "forig", "hts1a", "hts2a", "mmt1", "morig", "wia_16kHz")
_CODEC2_LONG = {"ve9qrp": 4, "vk5qi": 2}
_CODEC2_16K = ("raw/speech_orig_16k.wav", 2)
_ALSA_DIR = "usr/share/sounds/alsa"
# (voice, words per minute, pitch 0-99): distinct voices so the encoder sees several "speakers".
_ESPEAK_EN_VOICES = (("en-us", 165, 50), ("en-us+f3", 175, 70), ("en-gb+m3", 150, 35),
                     ("en-us+f4", 185, 60))
_ESPEAK_EN_TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.",
                    "Please call Stella and ask her to bring these things with her from the store.",
                    "A voice cloning service must never answer with a voice it was not asked for.")
_ESPEAK_ZH_TEXTS = ("你好，世界。今天天气很好。", "我们明天早上九点在火车站见面。")
_MIN_S, _MAX_S = 1.0, 8.0


@dataclass(frozen=True)
class CorpusItem:
    """One clip of the manifest.

    source_path: relative to <corpus>/raw/ (None for espeak-ng); files: sample rate ("16000",
    "22050") -> path relative to the corpus root; native_sample_rate: rate of the source audio.
    """

    id: str
    speaker: str
    source: str
    source_path: str | None
    license: str
    lang: str
    text: str | None
    split: str
    duration_s: float
    files: dict[str, str] = field(hash=False)
    native_sample_rate: int


@dataclass(frozen=True)
class _Clip:
    id: str
    speaker: str
    source: str
    source_path: str | None
    lang: str
    text: str | None
    wav: np.ndarray = field(repr=False, compare=False)
    sr: int = 0


def default_corpus_dir() -> Path:
    """$VOXPORT_CORPUS if set, else <repo root>/.voxport/corpus (repo root = this package's dir)."""
    env = os.environ.get("VOXPORT_CORPUS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / ".voxport" / "corpus"


class Corpus:
    """A built corpus: manifest items plus their audio files under `root`."""

    def __init__(self, root: Path, items: list[CorpusItem], packages: dict[str, str]):
        self.root = root
        self.packages = dict(packages)
        self._items = list(items)
        self._by_id = {it.id: it for it in items}

    def __len__(self) -> int:
        return len(self._items)

    def fingerprint(self) -> str:
        """The sha256 of the manifest: what calibration and gates saw (the stage cache's key)."""
        import hashlib

        return hashlib.sha256((self.root / "manifest.json").read_bytes()).hexdigest()

    def items(self, split: str | None = None, speaker: str | None = None,
              lang: str | None = None) -> list[CorpusItem]:
        """Items in manifest order, filtered by split ("calib"/"eval"), speaker and lang ("en"/"zh")."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [it for it in self._items if (split is None or it.split == split)
                and (speaker is None or it.speaker == speaker) and (lang is None or it.lang == lang)]

    def item(self, item_id: str) -> CorpusItem:
        try:
            return self._by_id[item_id]
        except KeyError:
            raise KeyError(f"no corpus item {item_id!r}") from None

    def speakers(self, split: str | None = None) -> dict[str, int]:
        """Speaker label -> number of clips (in `split`, or overall)."""
        return dict(Counter(it.speaker for it in self.items(split)))

    def audio(self, item: CorpusItem, sample_rate: int) -> np.ndarray:
        """The clip as float32 mono in [-1, 1] at `sample_rate` (16000 or 22050)."""
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {SAMPLE_RATES}, got {sample_rate}")
        path = self.root / item.files[str(sample_rate)]
        wav, sr = sf.read(path, dtype="float32")
        if sr != sample_rate or wav.ndim != 1:
            raise CorpusError(f"{path}: expected mono {sample_rate} Hz, found {sr} Hz, shape {wav.shape}")
        return wav

    def raw_path(self, item: CorpusItem) -> Path | None:
        """The original file extracted from the Debian package, or None for espeak-ng clips."""
        return None if item.source_path is None else self.root / "raw" / item.source_path


def load_corpus(path: Path | None = None) -> Corpus:
    """Read `<path>/manifest.json` (default: default_corpus_dir())."""
    root = Path(path) if path is not None else default_corpus_dir()
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise CorpusError(f"no speech corpus at {root}: build it with `python -m voxport.evaluate.corpus"
                          f"{'' if path is None else f' --out {root}'}`")
    data = json.loads(manifest.read_text(encoding="utf-8"))
    if data.get("version") != MANIFEST_VERSION:
        raise CorpusError(f"{manifest}: manifest version {data.get('version')} != {MANIFEST_VERSION}; "
                          "rebuild with `python -m voxport.evaluate.corpus --force`")
    return Corpus(root, [CorpusItem(**it) for it in data["items"]], data.get("packages", {}))


def build_corpus(out_dir: Path | None = None, force: bool = False) -> Path:
    """Download, cut, resample and split the corpus into `out_dir`; a no-op if already built.

    The corpus is built in a temporary directory beside `out_dir` and renamed into place, so an
    interrupted build never leaves a half corpus. Needs `apt-get` and an installed `espeak-ng`.
    """
    out = (Path(out_dir) if out_dir is not None else default_corpus_dir()).resolve()
    if (out / "manifest.json").is_file() and not force:
        log.info("corpus already present at %s (use force=True to rebuild)", out)
        return out
    if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise CorpusError(f"{out} exists and is not a voxport corpus; choose another --out")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise CorpusError("espeak-ng is not installed: run `apt-get install -y espeak-ng` (as root)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished corpus is shared read-only data
    try:
        packages = {pkg: _fetch_deb(pkg, tmp) for pkg in ("asterisk-core-sounds-en-wav",
                                                           "codec2-examples", "alsa-utils")}
        clips: list[_Clip] = []
        for pkg, collect in (("asterisk-core-sounds-en-wav", _asterisk_clips),
                             ("codec2-examples", _codec2_clips), ("alsa-utils", _alsa_clips)):
            new = collect(tmp / "raw" / pkg, pkg)
            log.info("%-28s %-10s %2d clips", pkg, packages[pkg], len(new))
            clips += new
        new = _espeak_clips(espeak, tmp / "espeak")
        packages["espeak-ng"] = _espeak_version(espeak)
        log.info("%-28s %-10s %2d clips", "espeak-ng", packages["espeak-ng"], len(new))
        clips += new
        shutil.rmtree(tmp / "espeak")
        items = [_write_clip(c, split, tmp) for c, split in zip(clips, _assign_splits(clips), strict=True)]
        manifest = {"version": MANIFEST_VERSION, "packages": packages,
                    "items": [asdict(it) for it in items]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("corpus of %d clips written to %s", len(items), out)
    return out


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished build to `out`, replacing an old corpus but never a foreign directory."""
    if out.exists():
        if not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise CorpusError(f"{out} exists and is not a voxport corpus; choose another --out")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
        return
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process (e.g. a parallel test session) finished the same build first.
        if not (out / "manifest.json").is_file():
            raise
        log.info("another build installed %s first; keeping it", out)
        shutil.rmtree(tmp)


def _fetch_deb(pkg: str, work: Path) -> str:
    """apt-get download into work/debs, dpkg-deb -x into work/raw/<pkg>; returns the version."""
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"`{tool}` not found: the corpus is built from Debian packages")
    run = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if run.returncode != 0 or not found:
        last = (run.stderr.strip().splitlines() or ["no .deb file was produced"])[-1]
        raise CorpusError(f"`apt-get download {pkg}` failed ({last}); if the package lists are stale "
                          "or missing, run `apt-get update` (as root) and retry")
    target = work / "raw" / pkg
    target.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(target)], check=True, capture_output=True)
    return found[-1].name.split("_")[1]


def _read(path: Path) -> tuple[np.ndarray, int]:
    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    return wav.mean(axis=1), sr


def _rel(path: Path, pkg_root: Path, pkg: str) -> str:
    return f"{pkg}/{path.relative_to(pkg_root).as_posix()}"


def _asterisk_clips(root: Path, pkg: str) -> list[_Clip]:
    # Deterministic: every 2-6 s prompt in sorted order, then 12 picks spread evenly across them.
    files = sorted((root / _ASTERISK_DIR).glob("*.wav"))
    fit = [f for f in files if 2.0 <= sf.info(f).duration <= 6.0]
    if len(fit) < _ASTERISK_COUNT:
        raise CorpusError(f"{pkg}: only {len(fit)} prompts of 2-6 s found under {_ASTERISK_DIR}")
    picks = [fit[i * len(fit) // _ASTERISK_COUNT] for i in range(_ASTERISK_COUNT)]
    return [_Clip(f"allison-{f.stem}", "allison", pkg, _rel(f, root, pkg), "en", None, *_read(f))
            for f in picks]


def _codec2_clips(root: Path, pkg: str) -> list[_Clip]:
    clips = []
    for stem in _CODEC2_SHORT:
        f = root / _CODEC2_DIR / "wav" / f"{stem}.wav"
        clips.append(_Clip(f"codec2-{stem.lower()}", f"codec2-{stem.lower()}", pkg, _rel(f, root, pkg),
                           "en", None, *_read(f)))
    longs = [(f"wav/{stem}.wav", n) for stem, n in _CODEC2_LONG.items()] + [_CODEC2_16K]
    for rel, n in longs:
        f = root / _CODEC2_DIR / rel
        wav, sr = _read(f)
        label = f"codec2-{f.stem.lower()}"
        for k, (a, b) in enumerate(_speech_segments(wav, sr, n)):
            clips.append(_Clip(f"{label}-seg{k}", label, pkg, _rel(f, root, pkg), "en", None,
                               wav[a:b], sr))
    return clips


def _alsa_clips(root: Path, pkg: str) -> list[_Clip]:
    files = [f for f in sorted((root / _ALSA_DIR).glob("*.wav")) if f.stem != "Noise"]
    # speaker-test speaks the channel name, so the file name is the transcript.
    return [_Clip(f"alsa-{f.stem.lower()}", "alsa", pkg, _rel(f, root, pkg), "en",
                  f.stem.replace("_", " "), *_read(f)) for f in files]


def _espeak_clips(espeak: str, work: Path) -> list[_Clip]:
    work.mkdir()
    jobs = [(v, s, p, "en", k, t) for v, s, p in _ESPEAK_EN_VOICES for k, t in enumerate(_ESPEAK_EN_TEXTS)]
    jobs += [("cmn", 160, 50, "zh", k, t) for k, t in enumerate(_ESPEAK_ZH_TEXTS)]
    clips = []
    for voice, speed, pitch, lang, k, text in jobs:
        name = voice.replace("+", "_")
        path = work / f"{name}-{k}.wav"
        run = subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path),
                              text], capture_output=True, text=True)
        if run.returncode != 0 or not path.is_file():
            raise CorpusError(f"espeak-ng -v {voice} failed: {run.stderr.strip() or run.returncode}")
        wav, sr = _read(path)
        clips.append(_Clip(f"espeak-{name}-s{k}", f"espeak-{voice}", "espeak-ng", None, lang, text,
                           _trim_silence(wav, sr), sr))
    return clips


def _espeak_version(espeak: str) -> str:
    out = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout.split()
    return out[3] if len(out) > 3 else "unknown"


def _frame_db(wav: np.ndarray, sr: int, hop_s: float = 0.01) -> np.ndarray:
    hop = int(sr * hop_s)
    n = len(wav) // hop
    energy = (wav[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(axis=1)
    return 10 * np.log10(energy + 1e-12)


def _trim_silence(wav: np.ndarray, sr: int, pad_s: float = 0.1) -> np.ndarray:
    db = _frame_db(wav, sr)
    voiced = np.flatnonzero(db > db.max() - 40)
    hop, pad = int(sr * 0.01), int(sr * pad_s)
    return wav[max(0, voiced[0] * hop - pad): min(len(wav), (voiced[-1] + 1) * hop + pad)]


def _speech_segments(wav: np.ndarray, sr: int, count: int) -> list[tuple[int, int]]:
    """Up to `count` (start, end) sample ranges of 3-7.5 s, each cut at the quietest point."""
    db = _frame_db(wav, sr)
    # 100 ms moving average: cut in a pause, not in a stop consonant.
    smooth = np.convolve(db, np.ones(10) / 10, mode="same")
    speech = db > db.max() - 35
    hop, segments, pos = int(sr * 0.01), [], 0
    while len(segments) < count:
        onsets = np.flatnonzero(speech[pos:])
        if onsets.size == 0:
            break
        start = max(0, pos + onsets[0] - 5)
        lo, hi = start + 300, min(start + 750, len(db))
        if hi - lo < 1:
            break
        cut = lo + int(np.argmin(smooth[lo:hi]))
        if speech[start:cut].mean() >= 0.5:
            segments.append((start * hop, cut * hop))
        pos = cut
    return segments


def _assign_splits(clips: list[_Clip]) -> list[str]:
    """Deterministic split by clip: every real speaker with >= 2 clips keeps >= 2 in eval,
    espeak voices appear in both splits, single-clip speakers alternate."""
    by_speaker: dict[str, list[int]] = {}
    for i, c in enumerate(clips):
        by_speaker.setdefault(c.speaker, []).append(i)
    split = ["calib"] * len(clips)
    singles = 0
    for speaker in sorted(by_speaker):
        idx = sorted(by_speaker[speaker], key=lambda i: clips[i].id)
        if speaker.startswith("espeak-"):
            chosen = idx[-1:]  # the last sentence is held out; the others calibrate
        elif len(idx) == 1:
            chosen, singles = (idx if singles % 2 else []), singles + 1
        elif len(idx) <= 3:
            chosen = idx[:2]
        else:
            chosen = idx[1::2]
        for i in chosen:
            split[i] = "eval"
    return split


def _write_clip(clip: _Clip, split: str, root: Path) -> CorpusItem:
    import librosa  # imported here: it pulls in numba, and only building needs it

    files = {}
    for sr in SAMPLE_RATES:
        wav = clip.wav if clip.sr == sr else librosa.resample(
            clip.wav, orig_sr=clip.sr, target_sr=sr, res_type="soxr_hq")
        peak = float(np.abs(wav).max())
        if peak > 0.99:  # resampling can overshoot a full-scale source; keep PCM_16 unclipped
            wav = wav * (0.99 / peak)
        rel = f"{sr // 1000}k/{clip.id}.wav"
        (root / rel).parent.mkdir(exist_ok=True)
        sf.write(root / rel, wav.astype(np.float32), sr, subtype="PCM_16")
        files[str(sr)] = rel
    duration = round(len(clip.wav) / clip.sr, 4)
    if not _MIN_S <= duration <= _MAX_S:
        raise CorpusError(f"clip {clip.id} lasts {duration:.2f} s, outside [{_MIN_S}, {_MAX_S}] s")
    return CorpusItem(clip.id, clip.speaker, clip.source, clip.source_path, LICENSES[clip.source],
                      clip.lang, clip.text, split, duration, files, clip.sr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voxport.evaluate.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="corpus directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        corpus = load_corpus(build_corpus(args.out, force=args.force))
    except CorpusError as exc:
        log.error("%s", exc)
        return 1
    for split in SPLITS:
        items = corpus.items(split)
        speakers = corpus.speakers(split)
        print(f"{split:5s}: {len(items):3d} clips, {sum(i.duration_s for i in items):6.1f} s, "
              f"{len(speakers)} speakers ({sum(n >= 2 for n in speakers.values())} with >= 2 clips)")
    print(f"corpus: {corpus.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
