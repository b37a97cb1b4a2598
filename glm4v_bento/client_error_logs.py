"""A client's malformed request is a warning in the server's log, not an error with a traceback.

BentoML answers a body that fails validation with a clear 400, but first logs it as
"Exception on <path>" at ERROR with the whole traceback: one client sending a wrong field
would page whoever alerts on errors, and bury the real failures. This filter rewrites those
records as one WARNING line that says what was refused; every other exception keeps its
ERROR and its traceback. The line names fields, never the values sent (prompts stay out).
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

# Where BentoML logs "Exception on <path> [<method>]" (its log_exception).
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"
_SHOWN_PROBLEMS = 5


class ClientErrorsAsWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            where = record.getMessage().removeprefix("Exception on ")
            record.msg, record.args = "refused a request to %s with 400: %s", (where, _problems(error))
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info, record.exc_text = None, None
        return True


def _problems(error: ValidationError) -> str:
    details = error.errors(include_input=False, include_context=False, include_url=False)
    shown = [f"{'.'.join(str(part) for part in d['loc']) or '(body)'}: {d['msg']}" for d in details[:_SHOWN_PROBLEMS]]
    more = len(details) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def install() -> None:
    """Filter BentoML's request-exception log (once per process)."""
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    if not any(isinstance(f, ClientErrorsAsWarnings) for f in logger.filters):
        logger.addFilter(ClientErrorsAsWarnings())
