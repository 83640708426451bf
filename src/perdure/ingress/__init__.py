"""The HTTP ingress: a runtime's workflows and actors as a JSON API (ASGI).

Needs the ``server`` extra (``pip install 'perdure[server]'``)::

    app = perdure.ingress.create_app(rt, token="s3cret")   # any ASGI server
    await perdure.ingress.serve(rt, host="127.0.0.1", port=8000)   # uvicorn

or from the command line: ``perdure serve --app myapp:service``.

Routes (JSON in, JSON out; errors are ``{"error": {"type", "message"}}``):

- ``POST /workflows/{name}``: run with the body's arguments (an object of
  keyword arguments or an array of positional ones) and wait: 200 with
  ``{"invocation_id", "status", "result"}``; ``?wait=false`` or
  ``POST /workflows/{name}/start``: 202 with the invocation id.
- ``POST /actors/{type}/{key}/{handler}``: ask (wait for the reply), or
  tell with ``?wait=false``.
- An ``Idempotency-Key`` header makes a retry attach to the first
  invocation; the same key with another body is a 409.
- ``GET /invocations``, ``/invocations/{id}``, ``/invocations/{id}/journal``,
  ``/actors/{type}/{key}/history``, ``/actors/{type}/{key}/state?at=N``.
- ``POST /promises/{id}/resolve`` (body: the value), ``/promises/{id}/reject``
  (``{"message"}``), ``POST /invocations/{id}/signals/{name}`` (body: the
  value), ``GET /invocations/{id}/queries/{name}``, ``POST
  /invocations/{id}/cancel`` (``{"reason"}``, optional); ``?timeout_seconds=``
  on a workflow start sets a deadline. Unknown: 404; a settled promise or a
  finished invocation: 409.
- ``GET /openapi.json``: the OpenAPI 3.1 document of all of the above.
- ``GET /ui/``: the time-travel web UI (``/`` redirects there); with a
  token, a browser signs in once with ``/ui/?token=<token>``.
- ``GET /metrics``: Prometheus metrics (with prometheus-client installed;
  ``create_app(..., metrics_public=True)`` serves them without the token).
"""

from __future__ import annotations

from ._app import create_app as create_app
from ._serve import is_loopback as is_loopback
from ._serve import serve as serve

__all__ = ["create_app", "is_loopback", "serve"]
