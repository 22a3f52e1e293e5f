"""Model ids a client can trust: every id ``GET /v1/models`` lists reaches what it names.

A finished job's ``fine_tuned_model`` is ``<base>:<adapter>`` (``jobs/lifecycle.py``), the name
SGLang's OpenAI serving (``OpenAIServingBase._parse_model_parameter``) resolves to the LoRA
adapter ``<adapter>`` in ``/v1/chat/completions``, ``/v1/completions`` and the other OpenAI
routes. Two things in SGLang 0.5.23 break the promise that the listed ids are the ones to use:

- its ``/v1/models`` lists each adapter under its bare ``lora_name`` (``parent`` = the base), so
  the id a job reports is not listed, and ``/v1/models/{id}`` answers 404 for it;
- a ``model`` without a colon never names an adapter: SGLang does not check the name at all
  (``"default"`` or any text gets the base model, by design), so the bare adapter name that its
  own list shows is silently answered by the base model.

What we change (Harli mode only; ``--harli-mode off`` is plain SGLang), and why:

- ``GET /v1/models`` and ``GET /v1/models/{id}`` are replaced, in place in the app's route list
  (so they match before anything else and the OpenAPI schema shows one of each), by routes that
  list the base model first (``data[0]`` stays the base, as clients expect), then one card per
  adapter SGLang can serve, with id ``<base>:<adapter>``, ``parent`` = the base, ``root`` = the
  adapter's path. "Can serve" is SGLang's registry plus its cache of adapters it reloads on
  demand (``lora_ref_cache``, after an LRU eviction under ``--max-loaded-loras``): each listed
  id answers. One id per model, the one a job reports, as OpenAI lists fine-tuned models.
- A bare adapter name resolves to its adapter (``_parse_model_parameter`` is wrapped once in this
  process): names with a colon are SGLang's as before, any other unknown name keeps reaching the
  base model as SGLang intends, and a name that means the base model never resolves to an
  adapter (:func:`base_names` and ``lifecycle.CLIENT_ALIASES``: the served name, the model path
  and its last part, SGLang's default ``"default"``, the OpenAI model names clients send by
  default). A job cannot take such a suffix (:func:`suffix_refusal`, a 400 at creation); this
  keeps an adapter stored under one before the rule from capturing those requests. We resolve
  rather than refuse with a 404 because the bare name is what SGLang's own list used to show and
  what SGLang's Responses API already treats as naming the adapter (``_known_model_names``): a
  client that asks for it means the adapter, and now gets it instead of the base. It is accepted
  but not listed, and ``/v1/models/{bare name}`` stays 404, so the list and lookups agree on one id.

Both read the TokenizerManager's dicts (microseconds): nothing here blocks SGLang's event loop.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from fastapi.routing import APIRoute

from sglang_harli.jobs.lifecycle import fine_tuned_model_name, reserved_name_reason

logger = logging.getLogger(__name__)

LIST_PATH = "/v1/models"
RETRIEVE_PATH = "/v1/models/{model:path}"


def base_names(manager: Any) -> frozenset[str]:
    """What the served model goes by: its served name, its path, the path's last part, and
    SGLang's default ``model`` (all reach the base model in SGLang's OpenAI routes)."""
    from sglang.srt.entrypoints.openai.protocol import DEFAULT_MODEL_NAME

    names = {manager.served_model_name, DEFAULT_MODEL_NAME}
    path = getattr(getattr(manager, "server_args", None), "model_path", None)
    if path:
        names |= {path, os.path.basename(os.path.normpath(path))}
    return frozenset(n for n in names if n)


def suffix_refusal(suffix: str) -> str | None:
    """Why a job may not take ``suffix`` as its adapter's name (a name that means the base
    model), or None. Reads the TokenizerManager's settings only."""
    reason = reserved_name_reason(suffix, base_names(_manager()))
    return None if reason is None else f"suffix {reason}; choose another"


def served_adapters(manager: Any) -> dict[str, str]:
    """Adapter name -> path, of every adapter a request can name: loaded (SGLang's registry,
    in its order) or evicted and reloaded on demand (SGLang's ``lora_ref_cache``)."""
    if not getattr(manager, "enable_lora", False):
        return {}
    adapters = {
        name: ref.lora_path for name, ref in manager.lora_registry.get_all_adapters().items()
    }
    for name, ref in list(manager.lora_ref_cache.items()):
        adapters.setdefault(name, ref.lora_path)
    return adapters


def is_served_adapter(manager: Any, name: str) -> bool:
    """:func:`served_adapters` has ``name``; membership tests only, safe off the event loop."""
    if not getattr(manager, "enable_lora", False):
        return False
    return name in manager.lora_ref_cache or name in manager.lora_registry.get_all_adapters()


def model_cards(manager: Any) -> list:
    from sglang.srt.entrypoints.openai.protocol import ModelCard

    base = manager.served_model_name
    context_len = manager.model_config.context_len
    cards = [ModelCard(id=base, root=base, max_model_len=context_len)]
    for name, path in served_adapters(manager).items():
        cards.append(
            ModelCard(
                id=fine_tuned_model_name(base, name),
                root=path,
                parent=base,
                max_model_len=context_len,  # an adapter serves the base's context
            )
        )
    return cards


def _manager() -> Any:
    from sglang.srt.entrypoints.http_server import get_global_state

    return get_global_state().tokenizer_manager


async def list_models():
    """The base model, then ``<base>:<adapter>`` for each adapter: OpenAI-compatible."""
    from sglang.srt.entrypoints.openai.protocol import ModelList

    return ModelList(data=model_cards(_manager()))


async def retrieve_model(model: str):
    """One card of :func:`list_models`, or OpenAI's 404."""
    for card in model_cards(_manager()):
        if card.id == model:
            return card
    body = {
        "message": f"The model '{model}' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    return ORJSONResponse({"error": body}, status_code=404)


def _replace_route(app: FastAPI, path: str, endpoint) -> None:
    """Put our GET ``path`` where SGLang's is (or first, if SGLang has none)."""
    app.add_api_route(path, endpoint, methods=["GET"], response_class=ORJSONResponse)
    routes = app.router.routes
    ours = routes.pop()
    theirs = [
        i
        for i, r in enumerate(routes)
        if isinstance(r, APIRoute) and r.path == path and "GET" in r.methods
    ]
    if theirs:
        routes[theirs[0]] = ours
        for i in reversed(theirs[1:]):
            del routes[i]
    else:
        routes.insert(0, ours)


def _resolve_bare_adapter_names() -> None:
    from sglang.srt.entrypoints.openai.serving_base import OpenAIServingBase

    parse = OpenAIServingBase._parse_model_parameter
    if getattr(parse, "harli_bare_adapter_names", False):
        return  # installed already

    def parse_model_parameter(self, model):  # may run in SGLang's executor threads
        base, adapter = parse(self, model)
        manager = self.tokenizer_manager
        if (
            adapter is None
            and isinstance(model, str)
            and model != manager.served_model_name
            and is_served_adapter(manager, model)
            and reserved_name_reason(model, base_names(manager)) is None
        ):
            return manager.served_model_name, model
        return base, adapter

    parse_model_parameter.harli_bare_adapter_names = True
    OpenAIServingBase._parse_model_parameter = parse_model_parameter


def install(app: FastAPI) -> None:
    """Before the server starts: our model routes, and bare adapter names resolved."""
    _replace_route(app, LIST_PATH, list_models)
    _replace_route(app, RETRIEVE_PATH, retrieve_model)
    _resolve_bare_adapter_names()
