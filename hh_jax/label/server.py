"""The labeling page: a local web server (standard library only) that shows the next
unlabeled pair of a pairs file and appends each judgement to a ComparisonStore
(`hh-jax label --pairs FILE --out FILE`).

Endpoints: `GET /` (the page), `GET /page.js`, `GET /api/next` (the next unlabeled pair in
file order + progress), `POST /api/label` {"id", "choice": "a"|"b", "strength": 1..3|null}.
A bad request gets a 4xx and changes nothing: unknown id 404, a replayed label 409, a body
over MAX_BODY 413, no Content-Length 411, not JSON 415, malformed JSON or fields 400, a
wrong path 404 or method 405. The store's lock makes it the one writer. Bound to 127.0.0.1
by default; there the Host header must name the loopback (a DNS-rebinding page cannot
post labels), and a non-JSON content type is refused so that a cross-site form cannot.
"""

from __future__ import annotations

import getpass
import http.server
import ipaddress
import json
import logging
import os
from importlib import resources

from hh_jax.data.hh import split_turns
from hh_jax.label.store import CHOICES, STRENGTHS, ComparisonStore, DuplicateLabel, read_pairs

log = logging.getLogger(__name__)
MAX_BODY = 64 << 10  # a label is ~60 bytes; anything near this is not one
_DRAIN = 1 << 20  # read and drop at most this much of an oversized body before answering
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"),
           "/page.js": ("page.js", "text/javascript; charset=utf-8")}
_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; "
        "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


class RequestError(Exception):
    """A request to refuse with `status` and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def default_labeler() -> str:
    """The OS user's name ("unknown" where there is none, e.g. a uid without passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class LabelApp:
    """The pairs of one file and the store their labels go to."""

    def __init__(self, pairs_path: str, store_path: str, labeler: str | None = None):
        self.pairs = read_pairs(pairs_path)
        self.by_id = {p["id"]: p for p in self.pairs}
        self.store = ComparisonStore(store_path)
        try:  # ids labeled with other texts: those labels are not these pairs'
            self.store.check_pairs(self.pairs, pairs_path)
        except ValueError:
            self.store.close()
            raise
        self.labeler = labeler or default_labeler()
        self.pairs_path = os.path.abspath(pairs_path)

    def progress(self, labeled: set[str]) -> dict:
        done = sum(p["id"] in labeled for p in self.pairs)
        return {"done": done, "total": len(self.pairs)}

    def next(self) -> dict:
        """The first unlabeled pair in file order (None when all are done) + progress."""
        labeled = self.store.labeled_ids()
        pair = next((p for p in self.pairs if p["id"] not in labeled), None)
        out = {"progress": self.progress(labeled), "labeler": self.labeler, "pair": None}
        if pair is not None:  # meta (which policy wrote which) stays hidden: no bias
            turns = [{"role": r or "Text", "text": t.strip()}
                     for r, t in split_turns(pair["context"])]
            out["pair"] = {"id": pair["id"], "turns": turns[:-1],  # last: the empty Assistant
                           "response_a": pair["response_a"].strip(),
                           "response_b": pair["response_b"].strip()}
        return out

    def label(self, body: bytes) -> dict:
        """Validates a POST /api/label body and appends the label; raises RequestError."""
        try:
            req = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from None
        if not isinstance(req, dict) or not {"id", "choice"} <= set(req) <= {
                "id", "choice", "strength"}:
            raise RequestError(400, 'expected {"id", "choice", "strength" (optional)}')
        strength = req.get("strength")
        if (not isinstance(req["id"], str) or req["choice"] not in CHOICES or
                strength is not None and (type(strength) is not int or strength not in STRENGTHS)):
            raise RequestError(400, "id must be a string, choice 'a' or 'b', strength 1-3/null")
        pair = self.by_id.get(req["id"])
        if pair is None:
            raise RequestError(404, f"no pair with id {req['id']!r} in {self.pairs_path}")
        try:
            self.store.append(pair, req["choice"], strength=strength, labeler=self.labeler,
                              pairs_file=self.pairs_path)
        except DuplicateLabel as e:
            raise RequestError(409, str(e)) from None
        return {"ok": True, "id": pair["id"], "progress": self.progress(self.store.labeled_ids())}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "hh-jax-label"
    protocol_version = "HTTP/1.1"
    app: LabelApp  # set on the subclass make_server builds

    def log_message(self, fmt, *args):  # the default prints every request to stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _check_host(self) -> None:
        if not is_loopback(self.server.server_address[0]):
            return  # --host was set on purpose: any name may reach it
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        if not is_loopback(host):
            raise RequestError(403, f"Host {host!r} is not the loopback")

    def _serve(self, method: str) -> None:
        try:
            self._check_host()
            path = self.path.split("?", 1)[0]
            allowed = {"/api/next": "GET", "/api/label": "POST", **{p: "GET" for p in _STATIC}}
            if path not in allowed:
                raise RequestError(404, f"no such page: {path}")
            if method != allowed[path]:
                raise RequestError(405, f"{path} takes {allowed[path]}, not {method}")
            if path in _STATIC:
                name, ctype = _STATIC[path]
                return self._send(200, resources.files(__package__).joinpath(name)
                                  .read_bytes(), ctype)
            if path == "/api/next":
                return self._json(200, self.app.next())
            return self._json(200, self.app.label(self._body()))
        except RequestError as e:
            self.close_connection = True  # a body may be left unread: never reuse
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # e.g. the store edited by hand: say so, keep serving
            log.exception("%s %s failed", method, self.path)
            self.close_connection = True
            self._json(500, {"error": f"server error: {e}"})

    def _body(self) -> bytes:
        """The request body, its size checked before anything is read."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send a Content-Length, not a chunked body")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        if not length.isdigit():
            raise RequestError(400, f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY:
            if int(length) <= _DRAIN:  # so the client can read the answer, not a reset
                self.rfile.read(int(length))
            raise RequestError(413, f"body of {length} bytes is over the {MAX_BODY} limit")
        body = self.rfile.read(int(length))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":  # a cross-site form cannot send this type
            raise RequestError(415, "Content-Type must be application/json")
        return body

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 resets a burst of connections (a few tabs)


def make_server(pairs_path: str, store_path: str, *, host: str = "127.0.0.1", port: int = 0,
                labeler: str | None = None) -> http.server.ThreadingHTTPServer:
    """A server (not yet serving) for the pairs; `server.url` is its address."""
    app = LabelApp(pairs_path, store_path, labeler)
    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can label (and see "
                    "the conversations); the default 127.0.0.1 keeps it to this machine", host)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = _Server((host, port), handler)
    name = f"[{host}]" if ":" in host else host
    server.url = f"http://{name}:{server.server_address[1]}/"
    return server
