"""The HTTP endpoints: the seed's API, the voice library, streaming and OpenAI's speech endpoint.

The seed's clients send the reference as `audio` and synthesize-with-embedding as a urlencoded form
with `embedding=[0.123, ...]`; both are accepted beside this service's own `reference` and JSON.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from voxport.errors import RequestError
from voxport.runtime.serve import schemas
from voxport.runtime.serve.engine import Controls
from voxport.runtime.serve.formats import FORMATS, OutputFormat, encode, encoded_rate, output_format
from voxport.runtime.serve.library import check_voice_id, embedding_sha256
from voxport.runtime.serve.service import Service, VoiceSource
from voxport.runtime.serve.uploads import encode_wav

log = logging.getLogger(__name__)
router = APIRouter()
Reference = Annotated[UploadFile | None, File(description="Reference speech (WAV, FLAC, OGG, MP3; any rate)")]
Audio = Annotated[UploadFile | None, File(description="The same as `reference`, under the seed API's name")]
UPLOAD_FIELDS = ("reference", "audio")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

_ERRORS = {
    404: "no voice with that id", 413: "body, upload or decoded audio over a limit, or text over the work budget",
    415: "not decodable as audio (or a body type the endpoint does not take)",
    422: "invalid input: unknown or out-of-range field, bad text, unusable audio, unsupported format",
    503: "at capacity (Retry-After)", 504: "past the request timeout",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of the errors an endpoint really gives ({"detail", "kind"} bodies)."""
    return {code: {"model": schemas.ErrorBody, "description": _ERRORS[code]} for code in codes}


def _service(request: Request) -> Service:
    return request.app.state.service


def _upload(reference: UploadFile | None, audio: UploadFile | None) -> UploadFile | None:
    """The reference under either name; both at once is ambiguous, so an error rather than a pick."""
    if reference is not None and audio is not None:
        raise RequestError("give the reference audio once: as `audio` (the seed API's name) or as `reference`, "
                           "not both")
    return audio if audio is not None else reference


async def _check_form(request: Request, model: type[BaseModel]) -> None:
    """Unknown form fields are a 422 naming them: ignored, a misspelt control would silently do nothing.
    (A form model's extra="forbid" cannot do it: it takes the file fields for extras.)"""
    known = set(model.model_fields) | set(UPLOAD_FIELDS)
    unknown = sorted(set((await request.form()).keys()) - known)
    if unknown:
        msg = f"unknown form field (accepted: {', '.join(sorted(known))})"
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("body", name), "msg": msg}
                                      for name in unknown])


async def _read(service: Service, upload: UploadFile | None) -> bytes | None:
    if upload is None:
        return None
    # Read at most one byte past the limit: enough to know the upload is too large.
    return service.check_upload_size(await upload.read(service.settings.limits.max_upload_bytes + 1))


def _audio_response(service: Service, wav: np.ndarray, source: VoiceSource, embedding: np.ndarray,
                    endpoint: str, seconds: float, fmt: OutputFormat) -> Response:
    duration = len(wav) / service.sample_rate
    if duration > 0:
        service.telemetry.rtf.labels(endpoint).observe(seconds / duration)
    headers = {**service.audio_headers(source, embedding), "X-Voxport-Duration-S": f"{duration:.3f}",
               "X-Voxport-Sample-Rate": str(encoded_rate(fmt, service.sample_rate))}
    return Response(encode(wav, service.sample_rate, fmt), media_type=fmt.media_type, headers=headers)


async def _synthesis(service: Service, text: str, source: VoiceSource, controls: Controls, stream: bool,
                     endpoint: str, fmt: OutputFormat = FORMATS["wav"], request: Request | None = None) -> Response:
    service.check_budget([text], controls)  # 413 before any work
    if stream:
        assert fmt.streams, fmt.name
        items = await service.engine.open_stream(
            lambda stop: service.stream_items(text, source, controls, stop, wav_header=fmt.container == "WAV"))
        headers = await items.__anext__()

        async def body():
            try:
                async for chunk in items:
                    yield chunk
            finally:
                await items.aclose()  # stops the worker when the client goes away
            if source.voice_id:
                service.library.touch(source.voice_id)

        return StreamingResponse(body(), media_type=fmt.media_type, headers=headers)

    def job(stop):
        start = time.perf_counter()
        embedding = service.embedding_of(source)
        wav = service.engine.synthesize([text], embedding, controls, stop)[0]
        return embedding, wav, time.perf_counter() - start

    disconnected = request.is_disconnected if request is not None else None
    embedding, wav, seconds = await service.engine.run(job, disconnected)
    if source.voice_id:
        service.library.touch(source.voice_id)
    return _audio_response(service, wav, source, embedding, endpoint, seconds, fmt)


@router.get("/health", response_model=schemas.Health, tags=["service"])
async def health(request: Request, response: Response) -> dict:
    """What serves each graph (backend, precision, artifact sha256, why), whether weights are real and
    which stored voices are quarantined (damaged files)."""
    service = _service(request)
    response.headers.update(service.weight_headers())
    # Voices that failed verification (moved aside, answered 410): an operator's to look at.
    return {**service.health(), "quarantined": service.library.quarantined()}


@router.get("/metrics", tags=["service"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: request and stage latency, RTF, queue depth, errors by kind."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_service(request).telemetry.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/api/v1/extract-embedding", response_model=schemas.EmbeddingResponse, tags=["voices"],
             responses=_errors(404, 413, 415, 422, 503, 504))
async def extract_embedding(request: Request, form: Annotated[schemas.EmbeddingForm, Form()],
                            reference: Reference = None, audio: Audio = None) -> dict:
    """Reference audio (`audio` or `reference`; or a stored voice_id) -> the speaker embedding (256 values,
    unit norm)."""
    await _check_form(request, schemas.EmbeddingForm)
    service = _service(request)
    source = service.voice(await _read(service, _upload(reference, audio)), form.voice_id)
    embedding = await service.engine.run(lambda stop: service.embedding_of(source))
    if source.voice_id:
        service.library.touch(source.voice_id)
    return {"embedding": embedding.tolist(), "dim": int(embedding.size), "sha256": embedding_sha256(embedding),
            "voice_id": source.voice_id, "weights": {"speaker_encoder": service.weights["speaker_encoder"]}}


@router.post("/api/v1/clone-voice", tags=["synthesis"], response_class=Response,
             responses={200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV"},
                        **_errors(404, 413, 415, 422, 503, 504)})
async def clone_voice(request: Request, form: Annotated[schemas.CloneForm, Form()],
                      reference: Reference = None, audio: Audio = None) -> Response:
    """Reference audio (`audio` or `reference`) or voice_id + text -> speech in that voice (WAV; `stream=true`
    for chunks)."""
    await _check_form(request, schemas.CloneForm)
    service = _service(request)
    text, controls = service.check_text(form.text), service.controls(form)
    source = service.voice(await _read(service, _upload(reference, audio)), form.voice_id)
    return await _synthesis(service, text, source, controls, form.stream, "clone-voice", request=request)


def _embedding_request_body() -> dict[str, Any]:
    """OpenAPI requestBody of synthesize-with-embedding: JSON, or the seed's form (embedding as text)."""
    schema = schemas.EmbeddingSynthesisRequest.model_json_schema()
    form = copy.deepcopy(schema)
    form["properties"]["embedding"] = {"type": "string", "title": "Embedding",
                                       "description": "A JSON-style list in the form field: [0.123, 0.456, ...]"}
    return {"required": True, "content": {"application/json": {"schema": schema},
                                          "application/x-www-form-urlencoded": {"schema": form}}}


def _form_values(form: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in data:
            raise RequestError(f"form field {key!r} is given more than once")
        if not isinstance(value, str):
            raise RequestError(f"form field {key!r} is a file; this endpoint takes text fields only")
        data[key] = value
    return data


def _embedding_field(text: str) -> Any:
    """The seed's `embedding=[0.123, ...]` form value -> a list (its values are checked by the model)."""
    try:
        return json.loads(text)
    except ValueError:
        shown = text if len(text) <= 40 else f"{text[:40]}…"
        msg = f"not a JSON-style list of numbers such as [0.123, 0.456, ...]: {shown!r}"
        raise RequestValidationError([{"type": "list_type", "loc": ("body", "embedding"), "msg": msg}]) from None


async def _embedding_request(request: Request) -> schemas.EmbeddingSynthesisRequest:
    """The body as JSON (this service's) or as a form (the seed's); unknown fields are 422 either way."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in FORM_TYPES:
        data = _form_values(await request.form())
        if "embedding" in data:
            data["embedding"] = _embedding_field(data["embedding"])
    elif media in ("", "application/json") or media.endswith("+json"):
        try:
            data = await request.json()
        except ValueError:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                           "msg": "the body is not valid JSON"}]) from None
    else:
        raise RequestError(f"Content-Type {media}: send application/json or application/x-www-form-urlencoded",
                           status=415)
    try:
        return schemas.EmbeddingSynthesisRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{k: v for k, v in e.items() if k in ("type", "msg")} | {"loc": ("body", *e["loc"])}
                  for e in exc.errors()]
        raise RequestValidationError(errors) from None


@router.post("/api/v1/synthesize-with-embedding", tags=["synthesis"], response_class=Response,
             openapi_extra={"requestBody": _embedding_request_body()},
             responses={200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV"},
                        **_errors(413, 415, 422, 503, 504)})
async def synthesize_with_embedding(request: Request) -> Response:
    """A speaker embedding + text -> speech (WAV; `stream=true` for chunks). JSON, or the seed's urlencoded
    form with `embedding=[0.123, ...]`."""
    service = _service(request)
    body = await _embedding_request(request)
    text, controls = service.check_text(body.text), service.controls(body)
    source = VoiceSource("embedding", embedding=service.check_embedding(body.embedding))
    return await _synthesis(service, text, source, controls, body.stream, "synthesize-with-embedding",
                            request=request)


@router.post("/api/v1/batch-synthesize", response_model=schemas.BatchResponse, tags=["synthesis"],
             responses=_errors(404, 413, 415, 422, 503, 504))
async def batch_synthesize(request: Request, form: Annotated[schemas.BatchForm, Form()],
                           reference: Reference = None, audio: Audio = None) -> dict:
    """Several texts in one voice (`audio` / `reference` or voice_id) -> one WAV each (base64 in JSON)."""
    await _check_form(request, schemas.BatchForm)
    service = _service(request)
    limit = service.settings.limits.max_batch_texts
    if len(form.texts) > limit:
        raise RequestError(f"{len(form.texts)} texts; at most {limit} per batch")
    texts = [service.check_text(t) for t in form.texts]
    controls = service.controls(form)
    service.check_budget(texts, controls)  # one budget for all the texts
    source = service.voice(await _read(service, _upload(reference, audio)), form.voice_id)

    def job(stop):
        start = time.perf_counter()
        embedding = service.embedding_of(source)
        return embedding, service.engine.synthesize(texts, embedding, controls, stop), time.perf_counter() - start

    embedding, wavs, seconds = await service.engine.run(job, request.is_disconnected)
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


# ---------------------------------------------------------------------- OpenAI-compatible speech

_SPEECH_TYPES = {fmt.media_type: {} for fmt in FORMATS.values()}


@router.post("/v1/audio/speech", tags=["openai"], response_class=Response,
             responses={200: {"content": _SPEECH_TYPES, "description": "Speech in `response_format`"},
                        **_errors(404, 413, 422, 503, 504)})
async def audio_speech(request: Request, body: schemas.SpeechRequest) -> Response:
    """OpenAI's text-to-speech call: `input` spoken in `voice`, a stored voice's id (there are no preset voices;
    `model` is ignored). wav and pcm are streamed as they are synthesized; flac, mp3 and opus sent whole."""
    service = _service(request)
    fmt = output_format(body.response_format, service.sample_rate)  # before any work: 422 if not encodable here
    text = service.check_text(body.input)
    controls = service.controls(schemas.SynthesisControls(speaking_rate=body.speed))
    source = service.voice(None, body.voice)  # 404 for an unknown id: never another voice
    response = await _synthesis(service, text, source, controls, fmt.streams, "audio-speech", fmt, request)
    if body.model is not None:
        response.headers["X-Voxport-Model"] = f"{body.model} (ignored: this server speaks with its bundle)"
    return response


# ------------------------------------------------------------------------------- voice library


@router.post("/api/v1/voices", response_model=schemas.VoiceCreated, status_code=201, tags=["voices"],
             responses=_errors(413, 415, 422, 503, 504))
async def add_voice(request: Request, form: Annotated[schemas.VoiceForm, Form()],
                    reference: Reference = None, audio: Audio = None) -> dict:
    """Store a voice from its reference speech (`audio` or `reference`): the normalized reference, embedding and
    metadata. Returns a server-made id."""
    await _check_form(request, schemas.VoiceForm)
    service = _service(request)
    data = await _read(service, _upload(reference, audio))
    if data is None:
        raise RequestError("a voice needs its reference speech: upload it as `audio` (or `reference`)")

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
