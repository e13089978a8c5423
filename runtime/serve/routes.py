"""The HTTP endpoints: the seed's API, the voice library and streaming."""

from __future__ import annotations

import base64
import logging
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import StreamingResponse

from voxport.errors import RequestError
from voxport.runtime.serve import schemas
from voxport.runtime.serve.engine import Controls
from voxport.runtime.serve.library import check_voice_id, embedding_sha256
from voxport.runtime.serve.service import Service, VoiceSource
from voxport.runtime.serve.uploads import encode_wav

log = logging.getLogger(__name__)
router = APIRouter()
Reference = Annotated[UploadFile | None, File(description="Reference speech (WAV, FLAC, OGG, MP3; any rate)")]


def _service(request: Request) -> Service:
    return request.app.state.service


async def _read(service: Service, upload: UploadFile | None) -> bytes | None:
    if upload is None:
        return None
    # Read at most one byte past the limit: enough to know the upload is too large.
    return service.check_upload_size(await upload.read(service.settings.limits.max_upload_bytes + 1))


def _wav_response(service: Service, wav: np.ndarray, source: VoiceSource, embedding: np.ndarray,
                  endpoint: str, seconds: float) -> Response:
    duration = len(wav) / service.sample_rate
    if duration > 0:
        service.telemetry.rtf.labels(endpoint).observe(seconds / duration)
    headers = {**service.audio_headers(source, embedding), "X-Voxport-Duration-S": f"{duration:.3f}"}
    return Response(encode_wav(wav, service.sample_rate), media_type="audio/wav", headers=headers)


async def _synthesis(service: Service, text: str, source: VoiceSource, controls: Controls, stream: bool,
                     endpoint: str) -> Response:
    if stream:
        items = await service.engine.open_stream(
            lambda stop: service.stream_items(text, source, controls, stop))
        headers = await items.__anext__()

        async def body():
            try:
                async for chunk in items:
                    yield chunk
            finally:
                await items.aclose()  # stops the worker when the client goes away
            if source.voice_id:
                service.library.touch(source.voice_id)

        return StreamingResponse(body(), media_type="audio/wav", headers=headers)

    def job(stop):
        start = time.perf_counter()
        embedding = service.embedding_of(source)
        wav = service.engine.synthesize([text], embedding, controls, stop)[0]
        return embedding, wav, time.perf_counter() - start

    embedding, wav, seconds = await service.engine.run(job)
    if source.voice_id:
        service.library.touch(source.voice_id)
    return _wav_response(service, wav, source, embedding, endpoint, seconds)


@router.get("/health", response_model=schemas.Health, tags=["service"])
async def health(request: Request, response: Response) -> dict:
    """What serves each graph (backend, precision, artifact sha256, why) and whether weights are real."""
    service = _service(request)
    response.headers.update(service.weight_headers())
    return service.health()


@router.get("/metrics", tags=["service"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: request and stage latency, RTF, queue depth, errors by kind."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_service(request).telemetry.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/api/v1/extract-embedding", response_model=schemas.EmbeddingResponse, tags=["voices"])
async def extract_embedding(request: Request, form: Annotated[schemas.EmbeddingForm, Form()],
                            reference: Reference = None) -> dict:
    """Reference audio (or a stored voice_id) -> the speaker embedding (256 values, unit norm)."""
    service = _service(request)
    source = service.voice(await _read(service, reference), form.voice_id)
    embedding = await service.engine.run(lambda stop: service.embedding_of(source))
    if source.voice_id:
        service.library.touch(source.voice_id)
    return {"embedding": embedding.tolist(), "dim": int(embedding.size), "sha256": embedding_sha256(embedding),
            "voice_id": source.voice_id, "weights": {"speaker_encoder": service.weights["speaker_encoder"]}}


@router.post("/api/v1/clone-voice", tags=["synthesis"], response_class=Response,
             responses={200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV"}})
async def clone_voice(request: Request, form: Annotated[schemas.CloneForm, Form()],
                      reference: Reference = None) -> Response:
    """Reference audio or voice_id + text -> speech in that voice (WAV; `stream=true` for chunks)."""
    service = _service(request)
    text, controls = service.check_text(form.text), service.controls(form)
    source = service.voice(await _read(service, reference), form.voice_id)
    return await _synthesis(service, text, source, controls, form.stream, "clone-voice")


@router.post("/api/v1/synthesize-with-embedding", tags=["synthesis"], response_class=Response,
             responses={200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV"}})
async def synthesize_with_embedding(request: Request, body: schemas.EmbeddingSynthesisRequest) -> Response:
    """A speaker embedding + text -> speech (WAV; `stream=true` for chunks)."""
    service = _service(request)
    text, controls = service.check_text(body.text), service.controls(body)
    source = VoiceSource("embedding", embedding=service.check_embedding(body.embedding))
    return await _synthesis(service, text, source, controls, body.stream, "synthesize-with-embedding")


@router.post("/api/v1/batch-synthesize", response_model=schemas.BatchResponse, tags=["synthesis"])
async def batch_synthesize(request: Request, form: Annotated[schemas.BatchForm, Form()],
                           reference: Reference = None) -> dict:
    """Several texts in one voice (reference or voice_id) -> one WAV each (base64 in JSON)."""
    service = _service(request)
    limit = service.settings.limits.max_batch_texts
    if len(form.texts) > limit:
        raise RequestError(f"{len(form.texts)} texts; at most {limit} per batch")
    texts = [service.check_text(t) for t in form.texts]
    controls = service.controls(form)
    source = service.voice(await _read(service, reference), form.voice_id)

    def job(stop):
        start = time.perf_counter()
        embedding = service.embedding_of(source)
        return embedding, service.engine.synthesize(texts, embedding, controls, stop), time.perf_counter() - start

    embedding, wavs, seconds = await service.engine.run(job)
    if source.voice_id:
        service.library.touch(source.voice_id)
    total = sum(len(w) for w in wavs) / service.sample_rate
    if total > 0:
        service.telemetry.rtf.labels("batch-synthesize").observe(seconds / total)
    items = [{"index": i, "text": t, "sample_rate": service.sample_rate, "duration_s": len(w) / service.sample_rate,
              "wav_base64": base64.b64encode(encode_wav(w, service.sample_rate)).decode("ascii")}
             for i, (t, w) in enumerate(zip(texts, wavs, strict=True))]
    return {"items": items, "voice": source.label, "embedding_sha256": embedding_sha256(embedding),
            "weights": service.weights}


# ------------------------------------------------------------------------------- voice library


@router.post("/api/v1/voices", response_model=schemas.VoiceCreated, status_code=201, tags=["voices"])
async def add_voice(request: Request, form: Annotated[schemas.VoiceForm, Form()],
                    reference: Annotated[UploadFile, File(description="Reference speech of the voice")]) -> dict:
    """Store a voice: its normalized reference, embedding and metadata. Returns a server-made id."""
    service = _service(request)
    data = await _read(service, reference)
    assert data is not None

    def job(stop):
        ref = service.reference(data)
        embedding = service.engine.embed(ref.wav, ref.sample_rate)
        return service.library.add(ref.wav_bytes, embedding, duration_s=ref.duration_s, sample_rate=ref.sample_rate,
                                   encoder_sha256=service.encoder_sha, name=form.name, ref_text=form.ref_text)

    voice, evicted = await service.engine.run(job)
    return {**voice.as_dict(), "evicted": evicted}


@router.get("/api/v1/voices", response_model=schemas.VoiceList, tags=["voices"])
async def list_voices(request: Request) -> dict:
    library = _service(request).library
    count, size = library.stats()
    return {"voices": [v.as_dict() for v in library.list()], "count": count, "bytes": size}


@router.get("/api/v1/voices/{voice_id}/reference.wav", tags=["voices"], response_class=Response,
            responses={200: {"content": {"audio/wav": {}}}})
async def voice_reference(request: Request, voice_id: str) -> Response:
    """The stored normalized reference (mono, 16 kHz, 16-bit PCM)."""
    path = _service(request).library.reference_path(check_voice_id(voice_id))
    return Response(path.read_bytes(), media_type="audio/wav")


# `:path` so that ids with slashes reach the id check (and get 422) instead of another route.
@router.get("/api/v1/voices/{voice_id:path}", response_model=schemas.VoiceDetail, tags=["voices"])
async def get_voice(request: Request, voice_id: str) -> dict:
    library = _service(request).library
    voice = library.get(check_voice_id(voice_id))
    return {**voice.as_dict(), "embedding": library.embedding(voice.id).tolist()}


@router.delete("/api/v1/voices/{voice_id:path}", response_model=schemas.VoiceInfo, tags=["voices"])
async def delete_voice(request: Request, voice_id: str) -> dict:
    return _service(request).library.delete(check_voice_id(voice_id)).as_dict()
