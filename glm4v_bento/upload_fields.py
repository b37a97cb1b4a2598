"""File fields take uploaded files only.

BentoML's multipart parser treats a *text* value in a file field as a URL and downloads
it (on this stack its address guard even fails with a 500). A server that fetches URLs
named by clients is a surprise at best and a way into internal networks at worst, so a
text value in a file field is refused with a 400 that says what to send instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails
from starlette.datastructures import UploadFile


def install() -> None:
    """Replace BentoML's multipart parser with one that refuses non-file values in file fields."""
    from _bentoml_impl import serde

    if getattr(serde.ALL_SERDE["multipart/form-data"], "_uploads_only", False):
        return

    class UploadsOnlyMultipartSerde(serde.MultipartSerde):
        _uploads_only = True

        async def parse_request(self, request: Any, cls: Any) -> Any:
            form = await request.form()  # Starlette caches it; the parent reads the same form
            errors: list[InitErrorDetails] = [
                {
                    "type": "value_error",
                    "loc": (field, index),
                    "input": "(text)",
                    "ctx": {"error": ValueError("must be an uploaded file (multipart file part), not a text value")},
                }
                for field in cls.multipart_fields
                for index, value in enumerate(form.getlist(field))
                if not isinstance(value, UploadFile)
            ]
            if errors:
                raise ValidationError.from_exception_data("Input", errors)
            return await super().parse_request(request, cls)

    for media_type, parser in list(serde.ALL_SERDE.items()):
        if parser is serde.MultipartSerde:
            serde.ALL_SERDE[media_type] = UploadsOnlyMultipartSerde
