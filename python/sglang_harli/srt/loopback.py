"""How the main process calls its own SGLang server over HTTP(S) (the adapter publisher's path).

SGLang may listen on any host, over TLS (``--ssl-certfile``/``--ssl-keyfile``), behind an api key
or an admin key. :class:`ServerEndpoint` says how to reach it from inside its own process, after
the rules of SGLang's own internal clients (``ServerArgs.url()``, ``ssl_verify_of``), so that a
server whose warm-up came through is reachable here too:

- URL: ``https`` when ``--ssl-certfile`` is set; a wildcard bind (``0.0.0.0``, empty, ``::``) is
  dialled on loopback (``127.0.0.1``, ``[::1]``); IPv6 addresses go in brackets.
- TLS trust: with ``--ssl-ca-certs``, the chain and the host name are verified against it, as
  SGLang's clients do. Without it SGLang turns verification off (self-signed certificates); we
  instead trust exactly the server's own certificate: ``--ssl-certfile`` is the only trust
  anchor (partial chains allowed, so a CA-issued leaf works as well as a self-signed one) and the
  host name is not checked, because we dial a loopback or bind address, not the name the
  certificate was issued for. Any other certificate is refused. The file is read on every call,
  so a certificate renewed on disk (``--enable-ssl-refresh``) is picked up.
- Auth: admin routes (``/load_lora_adapter`` is one) take the admin key when the server has one,
  else the api key (SGLang's ``ADMIN_OPTIONAL`` level); :attr:`ServerEndpoint.bearer` is that.
- Proxies from the environment are ignored: the target is this very server.

:meth:`ServerEndpoint.post_json` never raises for network or HTTP failures: it returns a
:class:`Reply` saying, in words a user understands, what went wrong and whether trying again can
help (no answer, a timeout, a 5xx or a 429 can; a refusal or an untrusted certificate cannot).
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
MAX_ERROR_CHARS = 500  # of a body that is not SGLang's JSON, quoted in a message


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def server_url(host: str | None, port: int, tls: bool) -> str:
    """The URL this process dials to reach its own server bound to ``host:port``."""
    host = (host or "").strip("[]")
    host = WILDCARD_HOSTS.get(host, host)
    if _is_ipv6(host):
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


@dataclasses.dataclass(frozen=True)
class Reply:
    """What one call came to. ``status`` is None when no HTTP answer came at all."""

    status: int | None
    body: Any = None  # the JSON answer, or its text when it is not JSON
    problem: str | None = None  # None: it worked; else why not, in words
    transient: bool = False  # trying again later can help

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclasses.dataclass(frozen=True)
class ServerEndpoint:
    url: str
    bearer: str | None = None
    ca_file: str | None = None  # --ssl-ca-certs: verify chain and host name against it
    pinned_cert: str | None = None  # --ssl-certfile alone: trust exactly this certificate

    @classmethod
    def from_server_args(cls, server_args: Any) -> ServerEndpoint:
        tls = bool(server_args.ssl_certfile)
        ca_file = server_args.ssl_ca_certs if tls else None
        return cls(
            url=server_url(server_args.host, server_args.port, tls),
            bearer=server_args.admin_api_key or server_args.api_key or None,
            ca_file=ca_file or None,
            pinned_cert=server_args.ssl_certfile if tls and not ca_file else None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        if self.pinned_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False  # see the module docstring
            context.verify_mode = ssl.CERT_REQUIRED
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            context.load_verify_locations(cafile=self.pinned_cert)
            return context
        return None

    def post_json(self, path: str, body: dict, timeout_s: float) -> Reply:
        url = self.url + path
        headers = {"Content-Type": "application/json"}
        if self.bearer:
            headers["Authorization"] = f"Bearer {self.bearer}"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            context = self.ssl_context()
        except (OSError, ssl.SSLError) as error:  # a certificate file being replaced, say
            return _no_answer(f"cannot read the server's certificate: {error}")
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(request, timeout=timeout_s) as response:
                return Reply(response.status, _parse(response.read()))
        except urllib.error.HTTPError as error:
            answer = _parse(_read(error))
            what = error_message(answer) or f"{error.code} {error.reason}"
            if error.code in (401, 403):
                what = f"the server refused the publisher's key ({error.code}: {what})"
            transient = error.code >= 500 or error.code == 429
            return Reply(error.code, answer, what, transient)
        except urllib.error.URLError as error:  # no answer: refused, unreachable, TLS handshake
            if isinstance(error.reason, ssl.SSLCertVerificationError):
                reason = error.reason.verify_message or str(error.reason)
                return Reply(None, problem=f"the server's TLS certificate is not trusted: {reason}")
            return _no_answer(f"cannot reach {self.url}: {error.reason}")
        except TimeoutError:  # connected, then no answer in time
            return _no_answer(f"{url} did not answer within {timeout_s:g} s")
        except (OSError, http.client.HTTPException) as error:  # reset, disconnected, bad answer
            what = str(error) or type(error).__name__
            return _no_answer(f"the connection to {self.url} failed: {what}")


def _no_answer(problem: str) -> Reply:
    """No HTTP answer came: worth another try (a server still starting, a dropped connection)."""
    return Reply(None, problem=problem, transient=True)


def _read(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


def _parse(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def error_message(answer: Any) -> str | None:
    """The error an SGLang answer carries, whatever route produced it.

    ``/load_lora_adapter`` answers ``{"success": false, "error_message": ...}`` (400); SGLang's
    auth middleware ``{"error": "Unauthorized"}``; ``_create_error_response`` and the OpenAI
    routes ``{"error": {"message": ...}}``; FastAPI ``{"detail": ...}``; a proxy, plain text.
    """
    if isinstance(answer, dict):
        for key in ("error_message", "message"):
            if answer.get(key):
                return str(answer[key])
        error = answer.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
        if answer.get("detail"):
            return str(answer["detail"])
        return None
    if isinstance(answer, str) and answer.strip():
        return answer.strip()[:MAX_ERROR_CHARS]
    return None
