"""The Perspective scorer: the real google-api-python-client against a fake API on 127.0.0.1."""

import json
import logging
import pickle
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from harness.api.errors import SecretMissingError
from harness.api.registry import METRICS

KEY = "AIzaFAKE-test-key-0123456789abcdef"


def discovery_document(root: str) -> dict:
    """A minimal commentanalyzer v1alpha1 discovery document (the shape Google serves)."""
    return {
        "kind": "discovery#restDescription", "discoveryVersion": "v1", "id": "commentanalyzer:v1alpha1",
        "name": "commentanalyzer", "version": "v1alpha1", "protocol": "rest",
        "rootUrl": root, "servicePath": "", "baseUrl": root, "batchPath": "batch",
        "parameters": {"key": {"type": "string", "location": "query"},
                       "alt": {"type": "string", "default": "json", "location": "query"}},
        "schemas": {
            "AnalyzeCommentRequest": {"id": "AnalyzeCommentRequest", "type": "object", "properties": {
                "comment": {"$ref": "TextEntry"}, "languages": {"type": "array", "items": {"type": "string"}},
                "requestedAttributes": {"type": "object", "additionalProperties": {"$ref": "AttributeParameters"}},
                "doNotStore": {"type": "boolean"}}},
            "TextEntry": {"id": "TextEntry", "type": "object", "properties": {"text": {"type": "string"}}},
            "AttributeParameters": {"id": "AttributeParameters", "type": "object", "properties": {}},
            "AnalyzeCommentResponse": {"id": "AnalyzeCommentResponse", "type": "object", "properties": {
                "attributeScores": {"type": "object", "additionalProperties": {"type": "object"}}}},
        },
        "resources": {"comments": {"methods": {"analyze": {
            "id": "commentanalyzer.comments.analyze", "path": "v1alpha1/comments:analyze",
            "flatPath": "v1alpha1/comments:analyze", "httpMethod": "POST", "parameters": {},
            "parameterOrder": [], "request": {"$ref": "AnalyzeCommentRequest"},
            "response": {"$ref": "AnalyzeCommentResponse"}}}}},
    }


def toy_score(text: str) -> float:
    return 0.9 if "idiot" in text else round(0.01 * (len(text) % 50), 4)


class FakeAPI:
    """Serves the discovery document and comments:analyze; ``script`` holds forced statuses."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[int] = []  # statuses to return before answering normally
        self.discovery_hits = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def _send(self, status, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                if url.path == "/$discovery/rest":
                    api.discovery_hits += 1
                    self._send(200, discovery_document(api.root))
                else:
                    self._send(404, {"error": {"code": 404, "message": "not found"}})

            def do_POST(self):
                url = urlparse(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                api.requests.append({"path": url.path, "query": parse_qs(url.query), "body": body,
                                     "t": time.monotonic()})
                if url.path != "/v1alpha1/comments:analyze":
                    return self._send(404, {"error": {"code": 404, "message": "no such method"}})
                if api.script:
                    status = api.script.pop(0)
                    messages = {400: "Attribute TOXICITY does not support request languages: xx",
                                403: "Permission denied: the API key is invalid.",
                                429: "Quota exceeded for quota metric 'Analysis requests'.",
                                500: "Internal error encountered.", 503: "The service is unavailable."}
                    return self._send(status, {"error": {"code": status, "message": messages.get(status, "error"),
                                                         "status": "FAILED"}})
                text = body["comment"]["text"]
                attr = next(iter(body["requestedAttributes"]))
                self._send(200, {"attributeScores": {attr: {"summaryScore": {"value": toy_score(text),
                                                                             "type": "PROBABILITY"}}},
                                 "languages": body.get("languages", ["en"])})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.discovery_url = self.root + "$discovery/rest?version=v1alpha1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    fake = FakeAPI()
    yield fake
    fake.close()


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    return KEY


def make(api, tmp_path, **kw):
    cls = METRICS.get("perspective")
    params = dict(discovery_url=api.discovery_url, cache_dir=str(tmp_path / "cache"), qps=1000.0,
                  backoff_base=0.001, timeout=5.0)
    params.update(kw)
    return cls(cls.Config(**params))


def chain_text(exc: BaseException) -> str:
    """Everything an exception would show: str, repr, the whole formatted traceback with causes."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    cur = exc
    while cur is not None:
        parts.append(repr(cur))
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
def test_registered_defaults(monkeypatch):
    monkeypatch.delenv("HARNESS_CACHE", raising=False)
    cls = METRICS.get("perspective")
    cfg = cls.Config()
    assert cls.kind == "toxicity" and cfg.attribute == "TOXICITY" and cfg.qps == 1.0
    assert cfg.discovery_url == "https://commentanalyzer.googleapis.com/$discovery/rest?version=v1alpha1"
    assert cfg.score_on == "generation" and cfg.cache_dir == "auto"
    assert cls().cache_dir() == "~/.cache/harness/perspective"


def test_auto_cache_dir_follows_harness_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    cls = METRICS.get("perspective")
    assert cls().cache_dir() == str(tmp_path / "perspective")
    assert cls(cls.Config(cache_dir=None)).cache_dir() is None


def test_missing_key_fails_in_check_ready(monkeypatch, api, tmp_path):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    scorer = make(api, tmp_path)
    with pytest.raises(SecretMissingError, match="PERSPECTIVE_API_KEY.*export.*key_file"):
        scorer.check_ready()
    assert api.discovery_hits == 0 and not api.requests


def test_key_file(monkeypatch, api, tmp_path):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    scorer = make(api, tmp_path, key_file=str(key_file))
    scorer.check_ready()
    assert scorer.score(["p"], [" hello"]) == [toy_score(" hello")]
    assert api.requests[0]["query"]["key"] == [KEY]


def test_scores_continuation_only_and_request_shape(api, with_key, tmp_path):
    scorer = make(api, tmp_path)
    scorer.check_ready()
    assert api.discovery_hits == 1
    prompts = ["Prompt one:", "Prompt two:", "Prompt three:"]
    gens = [" you idiot", "", " a calm reply"]
    scores = scorer.score(prompts, gens)
    assert scores == [0.9, 0.0, toy_score(" a calm reply")]
    assert len(api.requests) == 2  # the empty continuation is not sent
    body = api.requests[0]["body"]
    assert body["comment"] == {"text": " you idiot"}
    assert body["requestedAttributes"] == {"TOXICITY": {}}
    assert body["languages"] == ["en"] and body["doNotStore"] is True
    assert api.requests[0]["query"]["key"] == [KEY]
    prov = scorer.provenance()
    assert prov["attribute"] == "TOXICITY" and prov["requests"] == 2 and KEY not in json.dumps(prov)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_transient_errors_then_succeeds(api, with_key, tmp_path, status, caplog):
    api.script = [status, status]
    scorer = make(api, tmp_path)
    with caplog.at_level(logging.DEBUG):
        assert scorer.score(["p"], [" you idiot"]) == [0.9]
    assert len(api.requests) == 3 and scorer.stats["retries"] == 2
    assert f"HTTP {status}" in caplog.text and "retry 1/6" in caplog.text
    assert KEY not in caplog.text


def test_gives_up_after_max_retries(api, with_key, tmp_path):
    from metrics.perspective import PerspectiveError

    api.script = [503] * 10
    scorer = make(api, tmp_path, max_retries=2)
    with pytest.raises(PerspectiveError, match="HTTP 503.*gave up after 2 retries") as info:
        scorer.score(["p"], [" text"])
    assert len(api.requests) == 3 and info.value.status == 503
    assert KEY not in chain_text(info.value)


@pytest.mark.parametrize("status,needle", [(400, "rejected.*does not support"), (403, "refused.*PERSPECTIVE_API_KEY")])
def test_bad_request_and_refused_key_fail_at_once(api, with_key, tmp_path, status, needle, caplog):
    from metrics.perspective import PerspectiveError

    api.script = [status]
    scorer = make(api, tmp_path)
    with caplog.at_level(logging.DEBUG), pytest.raises(PerspectiveError, match=needle) as info:
        scorer.score(["p"], [" text"])
    assert len(api.requests) == 1 and info.value.status == status
    text = chain_text(info.value)
    assert KEY not in text and "HttpError" not in text
    assert KEY not in caplog.text


def test_key_redacted_from_every_log_line(api, with_key, tmp_path, caplog):
    """googleapiclient logs request URLs (with ?key=...) at DEBUG and on retries: all redacted."""
    api.script = [429, 500]
    with caplog.at_level(logging.DEBUG):
        scorer = make(api, tmp_path)
        scorer.check_ready()
        scorer.score(["a", "b"], [" one", " two idiot"])
    assert caplog.records, "expected some log lines"
    assert any("URL being requested" in r.getMessage() for r in caplog.records)  # the client did log URLs
    for record in caplog.records:
        assert KEY not in record.getMessage()
    assert KEY not in caplog.text


def test_redacts_http_error_repr(with_key, api, tmp_path):
    """What the client itself would raise carries the key in repr(); our redact() removes it."""
    import httplib2
    from googleapiclient.errors import HttpError

    from metrics.perspective import redact

    scorer = make(api, tmp_path)
    scorer.check_ready()  # registers the key
    err = HttpError(httplib2.Response({"status": 400}), b'{"error": {"message": "bad"}}',
                    uri=f"{api.root}v1alpha1/comments:analyze?key={KEY}&alt=json")
    assert KEY in repr(err)
    assert KEY not in redact(repr(err)) and KEY not in redact(str(err))
    assert redact("https://x/?alt=json&key=OTHERKEY123") == "https://x/?alt=json&key=[REDACTED]"


def test_cache_hit_sends_nothing(api, with_key, tmp_path):
    first = make(api, tmp_path)
    a = first.score(["p", "p"], [" text one", " text two idiot"])
    assert len(api.requests) == 2
    again = make(api, tmp_path)  # a new process would see the same folder
    assert again.score(["q", "q", "q"], [" text two idiot", " text one", " text two idiot"]) == [a[1], a[0], a[1]]
    assert len(api.requests) == 2 and again.stats["cache_hits"] == 2
    other_attr = make(api, tmp_path, attribute="INSULT")
    other_attr.score(["p"], [" text one"])
    assert len(api.requests) == 3  # the cache key includes the attribute
    no_cache = make(api, tmp_path, cache_dir=None)
    no_cache.score(["p"], [" text one"])
    assert len(api.requests) == 4


def test_duplicate_texts_in_one_call_are_sent_once(api, with_key, tmp_path):
    scorer = make(api, tmp_path, cache_dir=None)
    assert scorer.score(["a", "b", "c"], [" same", " same", " same"]) == [toy_score(" same")] * 3
    assert len(api.requests) == 1


def test_rate_limit_spaces_requests(api, with_key, tmp_path):
    scorer = make(api, tmp_path, qps=20.0, cache_dir=None)
    scorer.check_ready()
    scorer.score(["p"] * 4, [f" text {i}" for i in range(4)])
    times = [r["t"] for r in api.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.04  # 1/20 s apart, less scheduling slack


def test_rate_limiter_with_fake_clock():
    from metrics.perspective import RateLimiter

    now = [100.0]
    slept = []

    def sleep(dt):
        slept.append(round(dt, 6))
        now[0] += dt

    limiter = RateLimiter(2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert slept == [0.5, 0.5]


def test_pickle_drops_key_and_client(api, with_key, tmp_path, monkeypatch):
    scorer = make(api, tmp_path)
    scorer.check_ready()
    blob = pickle.dumps(scorer)
    assert KEY.encode() not in blob
    clone = pickle.loads(blob)
    assert clone.score(["p"], [" fresh text"]) == [toy_score(" fresh text")]  # re-reads the key from env
    assert KEY not in repr(scorer)


def test_unreachable_api_fails_with_network_error(with_key, tmp_path):
    from metrics.perspective import PerspectiveError

    cls = METRICS.get("perspective")
    scorer = cls(cls.Config(discovery_url="http://127.0.0.1:9/$discovery/rest?version=v1alpha1",
                            cache_dir=None, max_retries=1, backoff_base=0.001, timeout=2.0))
    with pytest.raises(PerspectiveError, match="network error.*gave up after 1 retries") as info:
        scorer._get_client()  # requests retry (max_retries)
    assert KEY not in chain_text(info.value)
    # the pre-flight makes one bounded attempt and never retries: an offline machine knows at once
    scorer = cls(cls.Config(discovery_url="http://127.0.0.1:9/$discovery/rest?version=v1alpha1",
                            cache_dir=None, max_retries=6, backoff_base=5.0, probe_timeout=1.0))
    t0 = time.monotonic()
    with pytest.raises(PerspectiveError, match="pre-flight: network error: cannot reach 127.0.0.1:9 within 1 s"):
        scorer.check_ready()
    assert time.monotonic() - t0 < 3.0 and scorer.stats["retries"] == 0
