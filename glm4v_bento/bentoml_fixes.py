"""Seven fixes to BentoML (1.4) behaviour, installed once when the service module loads.

1. File fields take uploaded files only, and a malformed multipart body (no boundary, say) is
   a 400, not a 500. BentoML's multipart parser treats a *text* value
   in a file field as a URL and downloads it (on this stack its address guard even fails
   with a 500). A server that fetches URLs named by clients is a surprise at best and a way
   into internal networks at worst, so such a value is refused with a 400 saying what to send.
   A binary file in a field that takes JSON (or in no field of the API: `image=@cat.jpg` for
   `image_file`) is a 400 naming the field; BentoML's parser failed decoding it, a 500. A field
   that takes one value but was sent twice (two `image_file`s to the one-image API) is a 400;
   BentoML kept one and dropped the other without a word.
2. Root models (such as the batcher's list of items) regenerate their JSON schema on every
   request, when parsing the input and again when choosing the response's media type; under
   load that was about a quarter of the server's CPU. A type's schema never changes, so it is
   generated once per type and copied out.
3. The request-timeout middleware arms a timer per request and leaves it armed after the
   request is answered, so every request is held in memory until its timeout (600 s here)
   has passed: under load, gigabytes. Here the timer is cancelled when the request ends;
   the behaviour is otherwise the same (504 if no response has started in time), except
   that the OpenAI routes answer it in OpenAI's error shape, as their other errors, and that
   a request whose handling fails before answering gets its 500 at once: BentoML's version
   waited out the whole timeout and then closed the connection without a response.
4. An API's inputs refuse fields it does not have (a 400 naming them). BentoML's input models
   ignored them, so `{"prompt": ..., "max_new_tokens": 3}` to /generate (where the length goes
   in `params`) ran to the default length, the client's limit dropped without a word.
5. A hub model that cannot be fetched when the server starts (no network, a typo in the id, a
   gated model without HF_TOKEN) stops it with one message saying why and what to do instead
   (model_source.download_failure). BentoML let the download's error through: three chained
   tracebacks, 126 lines, whose last line blamed the internet connection whatever the cause.
6. Each server keeps its Prometheus files in a directory of its own. BentoML used one per
   BENTOML_HOME and emptied it whenever a server started, so a second server on the machine
   (one per GPU, say) silently cut the first off from its own metrics: each /metrics then
   showed the other's counts. A directory named by PROMETHEUS_MULTIPROC_DIR is used as given
   (BentoML ignored it); otherwise each server makes a temporary one and removes it on exit.
7. The service's one worker sees the GPUs the server was started with (CUDA_VISIBLE_DEVICES
   chooses them). BentoML's GPU allocation showed it only the first GPU, so GLM4V_DEVICE=cuda:1
   failed and a GLM4V_DEVICE_MAP meant to spread the model over several GPUs put all but the
   first GPU's share on the CPU, slowly and without a word.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import os
import shutil
import tempfile
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException


def install() -> None:
    _check_multipart_parts()
    _cache_root_model_schemas()
    _disarm_request_timers()
    _refuse_unknown_input_fields()
    _explain_hub_download_failures()
    _give_each_server_its_own_metrics_directory()
    # Read by `bentoml serve` when it starts the worker; a value already set is kept.
    os.environ.setdefault("BENTOML_DISABLE_GPU_ALLOCATION", "1")


def _fixed_already(owner: type) -> bool:
    """Whether an earlier install() fixed this class: its own mark, not one inherited (IORootModel,
    fixed first, is a subclass of IODescriptor, fixed later)."""
    return "_glm4v_fixed" in vars(owner)


def _give_each_server_its_own_metrics_directory() -> None:
    """Called by `bentoml serve` before it starts its workers, which inherit the directory."""
    import bentoml.serving

    shared = bentoml.serving.ensure_prometheus_dir
    if getattr(shared, "_glm4v_fixed", False):
        return

    def ensure_prometheus_dir(directory: str | None = None, clean: bool = True, use_alternative: bool = True) -> str:
        if directory is None:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or _temporary_metrics_directory()
        return shared(directory, clean=clean, use_alternative=use_alternative)

    ensure_prometheus_dir._glm4v_fixed = True
    bentoml.serving.ensure_prometheus_dir = ensure_prometheus_dir


def _temporary_metrics_directory() -> str:
    directory = tempfile.mkdtemp(prefix="glm4v-bento-metrics-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _explain_hub_download_failures() -> None:
    """A failed download of a hub model raises model_source.ModelDownloadError, its cause left out."""
    from bentoml.models import HuggingFaceModel

    from glm4v_bento.model_source import download_failure

    if _fixed_already(HuggingFaceModel):
        return
    download = HuggingFaceModel.resolve

    def resolve(self: Any, *args: Any, **kwargs: Any) -> str:
        try:
            return download(self, *args, **kwargs)
        except OSError as error:  # huggingface_hub's errors are all OSErrors
            raise download_failure(self.model_id, self.revision, error) from None

    HuggingFaceModel.resolve = resolve
    HuggingFaceModel._glm4v_fixed = True


def _refuse_unknown_input_fields() -> None:
    """Input models that BentoML builds from an API's signature from now on forbid other fields."""
    from _bentoml_sdk.io_models import IODescriptor

    if _fixed_already(IODescriptor):
        return
    build = IODescriptor.from_input.__func__

    def from_input(cls: Any, *args: Any, **kwargs: Any) -> Any:
        model = build(cls, *args, **kwargs)
        if not getattr(model, "__root_input__", False):  # a root input is one value, not named fields
            model.model_config["extra"] = "forbid"
            model.model_rebuild(force=True)
        return model

    IODescriptor.from_input = classmethod(from_input)
    IODescriptor._glm4v_fixed = True


def _takes_a_list(model: Any, field: str) -> bool:
    """Whether the input model's field takes several multipart parts (a list of files)."""
    from typing import get_args

    from _bentoml_sdk.typing_utils import is_list_type, is_union_type

    annotation = model.model_fields[field].annotation
    if is_union_type(annotation):  # list[Path] | None: the list, as BentoML reads it
        annotation = get_args(annotation)[0]
    return field in model.multipart_fields and is_list_type(annotation)


async def _is_text(upload: UploadFile) -> bool:
    data = await upload.read()
    await upload.seek(0)  # BentoML's parser reads it again
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _field_error(loc: tuple[str | int, ...], sent: str, message: str) -> InitErrorDetails:
    """A 400's entry for a multipart part; ``sent`` stands in for its value, which is not echoed."""
    return {"type": "value_error", "loc": loc, "input": sent, "ctx": {"error": ValueError(message)}}


def _disarm_request_timers() -> None:
    from bentoml._internal.server.http import traffic

    from glm4v_bento.http_limits import reply_error

    middleware = traffic.TimeoutMiddleware
    if _fixed_already(middleware):
        return

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # done once the response has started

        def expire() -> None:
            if not started.done():
                started.set_exception(TimeoutError())

        timer = loop.call_later(self.timeout, expire)

        async def watching_send(message: Any) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        handling = asyncio.ensure_future(self.app(scope, receive, watching_send))
        # An app that ends without answering (it raised) ends the wait too, so its error reaches the
        # server (a 500, logged) at once; BentoML's version waited out the timeout, then dropped it.
        handling.add_done_callback(lambda _: started.done() or started.set_result(None))
        try:
            await started
        except TimeoutError:
            if handling.cancel():
                message = f"the request was not answered within {self.timeout} seconds"
                await reply_error(scope, send, 504, message, code="timeout")
            return
        finally:
            timer.cancel()  # the fix: nothing keeps the finished request alive
        await handling

    middleware.__call__ = call
    middleware._glm4v_fixed = True


def _cache_root_model_schemas() -> None:
    from _bentoml_sdk.io_models import IORootModel

    if _fixed_already(IORootModel):
        return
    generate = IORootModel.model_json_schema.__func__
    cache: dict[tuple, dict[str, Any]] = {}

    def model_json_schema(cls: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = generate(cls, *args, **kwargs)
        return copy.deepcopy(cache[key])  # callers may edit what they get

    IORootModel.model_json_schema = classmethod(model_json_schema)
    IORootModel._glm4v_fixed = True


def _check_multipart_parts() -> None:
    """Replace BentoML's multipart parser with one that first checks each part against the API's
    fields: files only in file fields, no binary file where JSON goes, no part the API does not
    have, one part where one value is taken."""
    from _bentoml_impl import serde

    if getattr(serde.ALL_SERDE["multipart/form-data"], "_parts_checked", False):
        return

    class CheckedPartsMultipartSerde(serde.MultipartSerde):
        _parts_checked = True

        async def parse_request(self, request: Any, cls: Any) -> Any:
            try:
                form = await request.form()  # Starlette caches it; the parent reads the same form
            except (MultiPartException, HTTPException) as exc:  # e.g. no boundary: the client's mistake
                reason = getattr(exc, "message", None) or getattr(exc, "detail", "")
                detail = _field_error(("body",), "", f"malformed multipart/form-data body ({reason})")
                raise ValidationError.from_exception_data("Input", [detail]) from None
            text_in_file_field = "must be an uploaded file (multipart file part), not a text value"
            errors: list[InitErrorDetails] = [
                _field_error((field, index), "(text)", text_in_file_field)
                for field in cls.multipart_fields
                for index, value in enumerate(form.getlist(field))
                if not isinstance(value, UploadFile)
            ]
            for field in dict.fromkeys(form.keys()):  # BentoML keeps one part of a field that takes one value
                sent = len(form.getlist(field))
                if sent > 1 and field in cls.model_fields and not _takes_a_list(cls, field):
                    one = "one file" if field in cls.multipart_fields else "one value"
                    errors.append(_field_error((field,), f"({sent} parts)", f"takes {one}, {sent} were sent"))
            takes_files = f"(fields that take files: {', '.join(cls.multipart_fields) or 'none'})"
            for field, value in form.multi_items():
                if field in cls.multipart_fields or not isinstance(value, UploadFile):
                    continue
                if field not in cls.model_fields:
                    errors.append(_field_error((field,), "(file)", f"not a field of this API {takes_files}"))
                elif not await _is_text(value):  # BentoML decodes the part as JSON text
                    errors.append(
                        _field_error((field,), "(file)", f"must be JSON text, not a binary file {takes_files}")
                    )
            if errors:
                raise ValidationError.from_exception_data("Input", errors)
            return await super().parse_request(request, cls)

    for media_type, parser in list(serde.ALL_SERDE.items()):
        if parser is serde.MultipartSerde:
            serde.ALL_SERDE[media_type] = CheckedPartsMultipartSerde
