"""BentoML's log of a refused request body: one warning line, no traceback; real errors unchanged."""

from __future__ import annotations

import logging
import sys

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from glm4v_bento.client_error_logs import BENTOML_HTTP_LOGGER, ClientErrorsAsWarnings, install


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int
    prompt: str


def logged_while_handling(error: Exception, caplog) -> logging.LogRecord:
    """What BentoML's ``log_exception`` logs for ``error`` (an ``except`` block's ERROR with exc_info)."""
    install()
    install()  # once is enough: a second install adds no second filter
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    assert sum(isinstance(f, ClientErrorsAsWarnings) for f in logger.filters) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=BENTOML_HTTP_LOGGER):
        try:
            raise error
        except Exception:
            logger.error("Exception on %s [%s]", "/generate", "POST", exc_info=sys.exc_info())
    [record] = caplog.records
    return record


def test_a_body_that_fails_validation_is_one_warning_naming_the_fields_not_the_values(caplog):
    with pytest.raises(ValidationError) as refused:
        Body.model_validate({"max_tokens": "many", "prompt": "my-secret-prompt", "extra": "also-secret"})
    record = logged_while_handling(refused.value, caplog)
    assert record.levelno == logging.WARNING and record.exc_info is None
    message = record.getMessage()
    assert message.startswith("refused a request to /generate [POST] with 400: max_tokens: Input should be a valid")
    assert "extra: Extra inputs are not permitted" in message
    assert "secret" not in message and "many" not in message
    assert "Traceback" not in caplog.text


def test_other_exceptions_keep_their_error_and_traceback(caplog):
    record = logged_while_handling(RuntimeError("the model broke"), caplog)
    assert record.levelno == logging.ERROR and record.getMessage() == "Exception on /generate [POST]"
    assert "Traceback" in caplog.text and "the model broke" in caplog.text
