"""shop reviews: what customers say about a product.

A Flotilla service in Python's standard library only (http.server, ssl,
sqlite3), to show that the runtime contract is enough for any language:

- binds FLOTILLA_LISTEN and serves mutual TLS 1.3 with the identity in
  FLOTILLA_TLS_CERT/KEY/CA, requiring a client certificate and reloading the
  files when the runtime renews them;
- checks every request against the ACL in FLOTILLA_ACL_FILE (403
  `acl_denied`, counted and logged; `audit` mode logs instead), on the
  normalised path, and trusts `x-flotilla-user-*` and
  `x-forwarded-client-cert` only from the gateway;
- owns its SQLite database (DATABASE_URL), seeded on first start;
- asks the catalog (FLOTILLA_URL_CATALOG, over mutual TLS, its peer's
  SPIFFE id checked) whether a product exists before taking a review of
  it: 404 `unknown_product` if not, 503 `catalog_unavailable` when the
  catalog does not answer or fails (5xx), 502 `catalog_error` when it
  answers what retrying will not change (a 403 from its ACL, say);
- answers /healthz, /readyz, /metrics, /openapi.json, logs JSON lines and
  drains on SIGTERM within FLOTILLA_DRAIN_SECONDS.

API: GET /api/reviews/{product_id} (the count, the average and the
latest 50), POST /api/reviews/{product_id} with {"author": "...",
"rating": 1-5, "text": "..."}: by a signed-in user only (the gateway's
`x-flotilla-user-id`), one review per user and product (a second replaces
the first); `author` is the name shown with it, the writer's choice
(as a nickname is on any shop's reviews), tied to their account here.
"""
import http.client
import json
import os
import re
import signal
import sqlite3
import ssl
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = os.environ.get("FLOTILLA_SERVICE", "reviews")
INSTANCE = os.environ.get("FLOTILLA_INSTANCE", SERVICE + "-0")
LISTEN = os.environ.get("FLOTILLA_LISTEN") or "127.0.0.1:" + os.environ.get("PORT", "8000")
DRAIN_SECONDS = float(os.environ.get("FLOTILLA_DRAIN_SECONDS", "10"))
TLS_VARS = ("FLOTILLA_TLS_CERT", "FLOTILLA_TLS_KEY", "FLOTILLA_TLS_CA")
HANDSHAKE_TIMEOUT = 10  # seconds a peer has to finish the TLS handshake
# Connections served at once, each by a thread of its own from accept to
# close (its handshake, its requests, its keep-alive wait): the Rust
# chassis's bound on handshakes (MAX_HANDSHAKES). Past it, accepting waits
# and the kernel's backlog holds new connections, so a flood of silent
# peers costs at most this many threads until their deadlines free them.
MAX_CONNECTIONS = 256
MAX_BODY = 64 * 1024
SHOWN = 50  # reviews in a product's list; the count and average are of all
CATALOG_URL = os.environ.get("FLOTILLA_URL_CATALOG")  # set by `calls = ["catalog"]`
CATALOG_TIMEOUT = 2  # seconds for each connect, send and read of a call to the catalog
USER_PREFIX = "x-flotilla-user-"
CLIENT_CERT_HEADER = "x-forwarded-client-cert"


def now_rfc3339():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The request this thread is handling, for its log lines (as the Rust
# chassis adds them): they join the gateway's access-log line of the request.
handling = threading.local()
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def log(level, message, **fields):
    line = {"timestamp": now_rfc3339(), "level": level, "service": SERVICE,
            "instance": INSTANCE, "fields": {"message": message, **fields}}
    for key in ("request_id", "trace_id"):
        value = getattr(handling, key, None)
        if value:
            line[key] = value
    print(json.dumps(line), flush=True)


# ---------------------------------------------------------------- metrics

class Metrics:
    """Prometheus counters and gauges, rendered as text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values = {}  # (name, sorted label items) -> value
        self.help = {}

    def add(self, name, labels, amount=1):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def set(self, name, labels, value):
        with self.lock:
            self.values[(name, tuple(sorted(labels.items())))] = value

    def render(self):
        with self.lock:
            items = sorted(self.values.items())
        out, seen = [], set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                kind = "gauge" if name.endswith(("_seconds", "_in_flight")) else "counter"
                out.append(f"# TYPE {name} {kind}")
            text = ",".join(f'{k}="{v}"' for k, v in labels)
            out.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
        return "\n".join(out) + "\n"


metrics = Metrics()


# --------------------------------------------------------------- identity

def spiffe_id(cert):
    """The URI SAN of a peer certificate from SSLSocket.getpeercert()."""
    uris = [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]
    return uris[0] if len(uris) == 1 else None


def cert_not_after(path):
    try:
        # CPython's own decoder (what getpeercert uses); private, hence the
        # guard: a missing metric is not worth failing for.
        info = ssl._ssl._test_decode_cert(path)
        return ssl.cert_time_to_seconds(info["notAfter"])
    except Exception:  # noqa: BLE001
        return None


class Identity:
    """The TLS contexts from the identity files, the server's and the
    client's (for calls), rebuilt when the runtime rewrites them. A
    damaged or half-written set keeps the current contexts and is retried
    on the next connection."""

    def __init__(self, cert, key, ca):
        self.files = (cert, key, ca)
        self.lock = threading.Lock()
        self.stamp = None
        self.contexts = None
        if self.contexts_now() is None:
            sys.exit(f"cannot load the TLS identity from {cert}, {key}, {ca}")

    def current(self):
        """The server context."""
        return self.contexts_now()[0]

    def client(self):
        """The client context: this identity's certificate, the system's
        roots, TLS 1.3; no host name check (a service address is an IP
        address: the caller checks the peer's SPIFFE id instead)."""
        return self.contexts_now()[1]

    def contexts_now(self):
        with self.lock:
            try:
                stamp = tuple((s.st_mtime_ns, s.st_ino, s.st_size) for s in map(os.stat, self.files))
            except OSError:
                return self.contexts
            if stamp != self.stamp:
                cert, key, ca = self.files
                try:
                    contexts = []
                    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
                        ctx = ssl.SSLContext(protocol)
                        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                        ctx.load_cert_chain(cert, key)
                        ctx.load_verify_locations(ca)
                        ctx.check_hostname = False
                        ctx.verify_mode = ssl.CERT_REQUIRED
                        contexts.append(ctx)
                except (OSError, ssl.SSLError, ValueError) as e:
                    log("WARN", "cannot load the renewed TLS identity; keeping the current one", error=str(e))
                    return self.contexts
                self.contexts, self.stamp = tuple(contexts), stamp
                not_after = cert_not_after(cert)
                if not_after is not None:
                    metrics.set("flotilla_cert_expiry_timestamp_seconds", {"service": SERVICE}, not_after)
            return self.contexts


# -------------------------------------------------------------------- ACL

class Denied(Exception):
    pass


def normalize_path(raw):
    """The one spelling ACL rules are written in (the same rules as the
    platform's): query cut off, unreserved escapes decoded, `//` and `.`
    removed, `..` applied; encoded `/`, backslashes, `;` (a path
    parameter, which servlet containers drop before routing), control
    characters, spaces, bad escapes and climbing above the root are
    refused (None)."""
    raw = re.split(r"[?#]", raw, maxsplit=1)[0]
    if not raw.startswith("/"):
        return None
    segments, trailing = [], False
    for segment in raw[1:].split("/"):
        decoded, i = [], 0
        while i < len(segment):
            c = segment[i]
            if c == "%":
                h = segment[i + 1:i + 3]
                if len(h) != 2 or any(x not in "0123456789abcdefABCDEF" for x in h):
                    return None
                v = int(h, 16)
                if v in (0x2F, 0x5C, 0x3B) or v < 0x20 or v == 0x7F:
                    return None
                ch = chr(v)
                decoded.append(ch if (ch.isascii() and ch.isalnum()) or ch in "-._~" else "%%%02X" % v)
                i += 3
            else:
                if c in "\\;" or ord(c) <= 0x20 or ord(c) == 0x7F:
                    return None
                decoded.append(c)
                i += 1
        s = "".join(decoded)
        trailing = False
        if s in ("", "."):
            trailing = True
        elif s == "..":
            if not segments:
                return None
            segments.pop()
            trailing = True
        else:
            segments.append(s)
    path = "".join("/" + s for s in segments)
    return path + "/" if not path or trailing else path


class Pattern:
    """`/a/*/c/**`: `*` one segment, `**` (last) the rest."""

    def __init__(self, source):
        self.source = source
        body = source[1:].rstrip("/") if source != "/" else ""
        self.segments = body.split("/") if body else []

    def matches(self, path):
        parts = [p for p in path.split("/") if p]
        for i, seg in enumerate(self.segments):
            if seg == "**":
                return True
            if i >= len(parts) or (seg != "*" and seg != parts[i]):
                return False
        return len(parts) == len(self.segments)

    def specificity(self, other):
        """> 0 when self is more specific: segment by segment a literal
        beats `*`, which beats `**`; then the longer exact part; then no
        trailing `**` beats one."""
        rank = lambda s: 0 if s == "**" else 1 if s == "*" else 2  # noqa: E731
        for a, b in zip(self.segments, other.segments):
            if rank(a) != rank(b):
                return rank(a) - rank(b)
        exact = lambda p: sum(1 for s in p.segments if s != "**")  # noqa: E731
        if exact(self) != exact(other):
            return exact(self) - exact(other)
        rest = lambda p: bool(p.segments) and p.segments[-1] == "**"  # noqa: E731
        return int(rest(other)) - int(rest(self))


def wins(a, b):
    """Whether rule a (pattern, names methods, deny) beats rule b: the more
    specific pattern, then naming methods, then deny."""
    order = a[0].specificity(b[0])
    if order:
        return order > 0
    return (a[1], a[2]) > (b[1], b[2])


def with_head(methods):
    """A rule's methods (None: any); one naming GET names HEAD too, since
    a HEAD runs the GET handler."""
    if not methods:
        return None
    return list(methods) + ["HEAD"] if "GET" in methods and "HEAD" not in methods else list(methods)


def is_user_header(name):
    """An end-user or client-certificate field, also spelt with `_` for
    `-`: http.server keeps both, and a CGI-style reader takes them as one."""
    name = name.lower().replace("_", "-")
    return name.startswith(USER_PREFIX) or name == CLIENT_CERT_HEADER


class Acl:
    """The default-deny policy the runtime derived from the manifest."""

    def __init__(self, spec):
        self.callee = spec["callee"]
        self.mode = spec.get("mode", "enforce")
        prefix = self.callee.rsplit("/svc/", 1)[0] + "/svc/"
        self.gateway = (spec.get("gateway") or {}).get("identity") or prefix + "gateway"
        runtime = spec.get("runtime")
        callers = set(spec.get("callers", []))
        self.rules = []  # (who, methods or None, pattern, deny)
        with_allow = set()
        for r in spec.get("rules", []):
            deny = r.get("effect", "allow") == "deny"
            caller = r["caller"]
            if caller in callers:
                who = ("service", caller)
                if not deny:
                    with_allow.add(caller)
            elif caller == "gateway":
                who = ("exact", self.gateway)
            elif caller == "runtime" and runtime:
                who = ("exact", runtime)
            else:
                raise ValueError(f"ACL rule names {caller}, which never calls {self.callee}")
            self.rules.append((who, with_head(r.get("methods")), Pattern(r["path"]), deny))
        for name in callers - with_allow:
            self.rules.append((("service", name), None, Pattern("/**"), False))
        for route in (spec.get("gateway") or {}).get("routes", []):
            self.rules.append((("exact", self.gateway), with_head(route.get("methods")), Pattern(route["path"]), False))
        if runtime:
            for path in ("/healthz", "/readyz", "/metrics"):
                self.rules.append((("exact", runtime), ["GET", "HEAD"], Pattern(path), False))

    def check(self, caller, method, raw_path):
        """The normalised path to serve, or raises Denied (enforce mode)."""
        path = normalize_path(raw_path)
        reason, rule = "allowed", None
        if path is None:
            reason = "invalid_path"
        elif caller is None or not caller.startswith(self.callee.rsplit("/svc/", 1)[0] + "/svc/"):
            reason = "foreign_identity"
        else:
            service = caller.rsplit("/svc/", 1)[1]
            best = None
            for who, methods, pattern, deny in self.rules:
                if who[0] == "service" and who[1] != service or who[0] == "exact" and who[1] != caller:
                    continue
                if methods is not None and method not in methods:
                    continue
                # Deny rules match case-insensitively and on the path with
                # its escapes decoded, as a framework routes on it.
                target = urllib.parse.unquote(path).lower() if deny else path
                patt = Pattern(pattern.source.lower()) if deny else pattern
                if not patt.matches(target):
                    continue
                candidate = (pattern, methods is not None, deny)
                if best is None or wins(candidate, best):
                    best = candidate
            if best is None:
                reason = "no_matching_rule"
            elif best[2]:
                reason, rule = "denied_by_rule", best[0].source
            else:
                rule = best[0].source
        if reason == "allowed":
            return path
        callee_name = self.callee.rsplit("/svc/", 1)[1]
        label = caller.rsplit("/svc/", 1)[1] if caller and caller.startswith(self.callee.rsplit("/svc/", 1)[0]) else str(caller)
        fields = dict(caller=caller, callee=self.callee, method=method, path=path or raw_path, reason=reason, rule=rule or "-")
        if self.mode == "audit":
            metrics.add("flotilla_authz_audit_would_deny_total", {"caller": label, "callee": callee_name})
            log("WARN", "acl audit: would deny", **fields)
            return path or raw_path.split("?")[0]
        metrics.add("flotilla_authz_denied_total", {"caller": label, "callee": callee_name})
        log("WARN", "acl denied", **fields)
        raise Denied(reason)


# --------------------------------------------------------------- database

SEED = [
    ("sku-espresso", "Ana", 5, "Rich and chocolatey; my morning espresso."),
    ("sku-espresso", "Ben", 4, "Great crema, a touch bitter for milk drinks."),
    ("sku-filter", "Chloe", 5, "Bright and floral in a V60."),
    ("sku-decaf", "Dev", 4, "Hard to tell it is decaf."),
    ("sku-green-tea", "Emi", 5, "Sweet and grassy, as a sencha should be."),
    ("sku-grinder", "Femi", 4, "Consistent grind; a little loud."),
    ("sku-kettle", "Gus", 5, "The temperature hold is perfect for pour-over."),
    ("sku-mug", "Hana", 3, "Lovely glaze, smaller than I expected."),
]


# ---------------------------------------------------------------- catalog

class CatalogClient:
    """Connections to the catalog, kept open and reused as the runtime
    contract asks (a handshake costs far more than a request): a few idle
    ones at most, dropped when the identity is renewed. Over mutual TLS
    with this instance's identity, the peer's SPIFFE id checked, when the
    address is https."""

    IDLE = 4  # idle connections kept

    def __init__(self, url):
        self.url = urllib.parse.urlsplit(url)
        self.lock = threading.Lock()
        self.idle = []  # (connection, the client context it was made with)

    def context(self):
        return identity.client() if self.url.scheme == "https" and identity is not None else None

    def connect(self, context):
        if context is None:
            conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=CATALOG_TIMEOUT)
            conn.connect()
            return conn
        conn = http.client.HTTPSConnection(self.url.hostname, self.url.port, timeout=CATALOG_TIMEOUT,
                                           context=context)
        conn.connect()
        expected = acl.callee.rsplit("/svc/", 1)[0] + "/svc/catalog"
        peer = spiffe_id(conn.sock.getpeercert())
        if peer != expected:
            conn.close()
            raise ssl.SSLError(f"the catalog's address answered as {peer}, not {expected}")
        return conn

    # What a kept connection the catalog closed meanwhile (a restart, a
    # drain) fails with before any answer: the request is sent once more,
    # on a new connection. A timeout is not one of them: the catalog may
    # be hung, and waiting again would only double the wait.
    CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
              ssl.SSLEOFError, ssl.SSLZeroReturnError)

    def get(self, path, headers):
        """(status, body) of GET `path`, on a kept connection if there is
        one; if that one turns out closed (CLOSED), once more on a new
        connection. Any other failure is raised."""
        context = self.context()
        with self.lock:
            stale = [c for c, ctx in self.idle if ctx is not context]
            self.idle = [(c, ctx) for c, ctx in self.idle if ctx is context]
            kept = self.idle.pop()[0] if self.idle else None
        for c in stale:  # made with an identity since renewed
            c.close()
        if kept is not None:
            try:
                return self.exchange(kept, context, path, headers)
            except self.CLOSED:
                pass
        return self.exchange(self.connect(context), context, path, headers)

    def exchange(self, conn, context, path, headers):
        """One GET on `conn`, which is kept afterwards if it may be reused
        (and closed whatever else happens)."""
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except BaseException:
            conn.close()
            raise
        with self.lock:
            if response.will_close or len(self.idle) >= self.IDLE:
                conn.close()
            else:
                self.idle.append((conn, context))
        return response.status, body


catalog = CatalogClient(CATALOG_URL) if CATALOG_URL else None


def product_exists(product_id):
    """Whether the catalog knows `product_id`: True, False, "error" when
    it answered what retrying will not change (a 403 from its ACL, a 404
    that is not about this product: a route gone), or None when it could
    not tell (no connection, no answer within CATALOG_TIMEOUT per step, a
    5xx, a peer that is not the catalog). This request's id and trace
    context go along (the values this thread validated), so the call joins
    the request's trace and log lines. Without FLOTILLA_URL_CATALOG
    (reviews run without `calls = ["catalog"]`), every product is taken to
    exist."""
    if catalog is None:
        return True
    forwarded = {}
    if handling.request_id:
        forwarded["x-request-id"] = handling.request_id
    if handling.traceparent:
        forwarded["traceparent"] = handling.traceparent
    try:
        status, body = catalog.get(
            f"/api/catalog/products/{urllib.parse.quote(product_id)}?reviews=false", forwarded)
    except (OSError, http.client.HTTPException) as e:
        log("WARN", "the catalog did not answer whether a product exists", error=str(e))
        return None
    if status == 200:
        return True
    if status >= 500:
        log("WARN", "the catalog could not say whether a product exists", status=status)
        return None
    try:
        said = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        said = {}
    if status == 404 and isinstance(said, dict) and (said.get("details") or {}).get("id") == product_id:
        return False
    log("ERROR", "the catalog refused to say whether a product exists", status=status,
        code=said.get("code") if isinstance(said, dict) else None)
    return "error"


def database_path():
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit('DATABASE_URL is not set; add `data = "sqlite"` to service `reviews` in flotilla.toml')
    if not url.startswith("sqlite:"):
        sys.exit("DATABASE_URL must be a sqlite:// URL")
    path = urllib.parse.urlparse(url).path if url.startswith("sqlite://") else url[len("sqlite:"):]
    return urllib.parse.unquote(path)


def connect():
    db = sqlite3.connect(database_path(), timeout=5, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def migrate():
    db = connect()
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            db.execute("""CREATE TABLE reviews (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                product_id TEXT NOT NULL,
                author TEXT NOT NULL,
                rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
                text TEXT NOT NULL,
                created_at TEXT NOT NULL)""")
            db.execute("CREATE INDEX reviews_by_product ON reviews (product_id, id)")
            db.executemany(
                "INSERT INTO reviews (product_id, author, rating, text, created_at) VALUES (?, ?, ?, ?, ?)",
                [(p, a, r, t, "2024-01-01T00:00:00Z") for p, a, r, t in SEED])
            db.execute("PRAGMA user_version = 1")
        if version < 2:
            # Who wrote each review (the seeded ones: nobody), one per user
            # and product: a review is a signed-in user's, and one user
            # cannot bury a product's reviews under copies of theirs.
            db.execute("ALTER TABLE reviews ADD COLUMN user_id TEXT")
            db.execute("CREATE UNIQUE INDEX reviews_by_user ON reviews (product_id, user_id)")
            db.execute("PRAGMA user_version = 2")
        db.execute("COMMIT")
    except Exception:
        db.execute("ROLLBACK")
        raise
    finally:
        db.close()


local = threading.local()


def db():
    if getattr(local, "db", None) is None:
        local.db = connect()
    return local.db


def product_reviews(product_id):
    """The count and average of all of a product's reviews, and the latest
    SHOWN of them, oldest first: a page's worth, however many there are."""
    count, average = db().execute(
        "SELECT count(*), avg(rating) FROM reviews WHERE product_id = ?", (product_id,)).fetchone()
    rows = db().execute(
        "SELECT id, author, rating, text, created_at FROM reviews WHERE product_id = ? ORDER BY id DESC LIMIT ?",
        (product_id, SHOWN)).fetchall()
    items = [dict(r) for r in reversed(rows)]
    average = round(average, 2) if average is not None else None
    return {"product_id": product_id, "count": count, "average_rating": average, "reviews": items}


def reviews_tag(product_id):
    """The entity tag of a product's reviews, from the index alone: a
    review is added, or replaced by its writer's next under a new id
    (AUTOINCREMENT never gives an id again), so their number and the last
    id name the list.
    The gateway's cache asks with it when its copy goes stale, and a 304
    costs one indexed lookup instead of building the page."""
    count, last = db().execute(
        "SELECT count(*), coalesce(max(id), 0) FROM reviews WHERE product_id = ?",
        (product_id,)).fetchone()
    return f'W/"{count}-{last}"'


def none_match(header, tag):
    """Whether an If-None-Match names `tag` (compared weakly, RFC 9110
    13.1.2) or is `*`."""
    if not header:
        return False
    opaque = tag.removeprefix("W/")
    asked = (t.strip() for t in header.split(","))
    return any(t == "*" or t.removeprefix("W/") == opaque for t in asked)


# ------------------------------------------------------------------- HTTP

PRODUCT = re.compile(r"^/api/reviews/([A-Za-z0-9._~-]{1,100})$")

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "shop-reviews", "version": "0.1.0",
             "description": "Customer reviews of the shop's products."},
    "paths": {
        "/api/reviews/{product_id}": {
            "parameters": [{"name": "product_id", "in": "path", "required": True,
                            "schema": {"type": "string"}, "example": "sku-espresso"}],
            "get": {"operationId": "listReviews", "summary": "A product's reviews",
                    "responses": {"200": {"description": "The count and average of all reviews, and the latest 50, oldest first",
                                          "headers": {"ETag": {"description": "Names this list; send it back in If-None-Match",
                                                               "schema": {"type": "string"}}},
                                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Reviews"}}}},
                                  "304": {"description": "Unchanged since the ETag in If-None-Match"}}},
            "post": {"operationId": "addReview", "summary": "Review a product",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewReview"}}}},
                     "responses": {"201": {"description": "The review",
                                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Review"}}}},
                                   "400": {"description": "Invalid review"},
                                   "401": {"description": "Not signed in"},
                                   "404": {"description": "The catalog has no such product (unknown_product)"},
                                   "411": {"description": "A body without a Content-Length"},
                                   "503": {"description": "The catalog could not say whether the product exists (catalog_unavailable)"}}},
        }
    },
    "components": {"schemas": {
        "NewReview": {"type": "object", "required": ["author", "rating", "text"],
                      "properties": {"author": {"type": "string", "maxLength": 100},
                                     "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                                     "text": {"type": "string", "maxLength": 2000}}},
        "Review": {"type": "object", "properties": {"id": {"type": "integer"}, "author": {"type": "string"},
                                                    "rating": {"type": "integer"}, "text": {"type": "string"},
                                                    "created_at": {"type": "string"}}},
        "Reviews": {"type": "object", "properties": {
            "product_id": {"type": "string"}, "count": {"type": "integer"},
            "average_rating": {"type": "number", "nullable": True},
            "reviews": {"type": "array", "items": {"$ref": "#/components/schemas/Review"}}}},
    }},
}


UNPAIRED_SURROGATE = "must be Unicode text: it has an unpaired surrogate (an escape such as \\ud800 alone)"


def is_unicode(value):
    """Whether a string from json.loads is text that can be stored: JSON
    lets an escape name half of a UTF-16 pair alone ("\\ud800"), which
    Python keeps as a lone surrogate and SQLite's UTF-8 cannot hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def error(code, message, **extra):
    return {"error": {"code": code, "message": message, **extra}}


CONTENT_LENGTH = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit takes "²"


def body_length(headers):
    """The request body's length by its Content-Length (0 without one), or
    None when that header cannot be believed: anything but ASCII digits
    (int() would take "-1", which reads to the end of the stream, and
    "+5", " 5", "5_0"), or several that disagree (RFC 9112 6.3). Digits
    past any body accepted count as MAX_BODY + 1: int() refuses more than
    4300 of them."""
    lengths = set()
    for value in headers.get_all("content-length") or ():
        value = value.strip(" \t")
        if not CONTENT_LENGTH.fullmatch(value):
            return None
        digits = value.lstrip("0")
        lengths.add(int(digits or "0") if len(digits) <= 18 else MAX_BODY + 1)
    if len(lengths) > 1:
        return None
    return lengths.pop() if lengths else 0


class State:
    draining = False
    in_flight = 0
    lock = threading.Lock()


identity = Identity(*map(os.environ.get, TLS_VARS)) if all(map(os.environ.get, TLS_VARS)) else None
acl = None
if identity is not None:
    acl_file = os.environ.get("FLOTILLA_ACL_FILE")
    if not acl_file:
        sys.exit("FLOTILLA_ACL_FILE is not set; the runtime sets it with FLOTILLA_TLS_*")
    with open(acl_file) as f:
        acl = Acl(json.load(f))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: callers reuse connections
    server_version = "shop-reviews"
    peer = None

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(HANDSHAKE_TIMEOUT)
            self.request.do_handshake()
            self.peer = spiffe_id(self.request.getpeercert())
        # Idle keep-alive connections are closed after a minute.
        self.request.settimeout(60)
        super().setup()

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        started = time.monotonic()
        request_id = self.headers.get("x-request-id") or ""
        handling.request_id = request_id if REQUEST_ID.fullmatch(request_id) else None
        trace = TRACEPARENT.fullmatch(self.headers.get("traceparent") or "")
        handling.trace_id = trace.group(1) if trace and trace.group(1) != "0" * 32 else None
        # Passed on, checked, to what this request calls (the catalog).
        handling.traceparent = trace.group(0) if handling.trace_id else None
        route, status = "unmatched", 500
        # A body nobody reads would be parsed as the next request on this
        # keep-alive connection: answers that leave one close it. A
        # Transfer-Encoding says a body follows whatever the Content-Length
        # says (http.server reads by Content-Length only).
        self.length = body_length(self.headers)
        self.body_pending = bool(self.headers.get("transfer-encoding")) or self.length != 0
        with State.lock:
            State.in_flight += 1
        # Nothing between the count and the try: whatever raises, the
        # finally takes it back, or every later drain waits its deadline.
        try:
            if self.length is None:
                status = 400
                return self.reply(400, error("bad_request", "the Content-Length header is invalid"))
            path = self.path
            if acl is not None:
                try:
                    path = acl.check(self.peer, method, self.path)
                except Denied as denied:
                    status = 403
                    return self.reply(403, error("acl_denied", "this service does not accept this call from the caller's identity",
                                                 details={"reason": str(denied), "caller": self.peer, "callee": acl.callee}))
                if self.peer != acl.gateway:
                    for name in [h for h in self.headers.keys()
                                 if is_user_header(h)]:
                        del self.headers[name]
            route, status = self.route(method, path)
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the server
            log("ERROR", "request failed", error=repr(e), path=self.path)
            status = 500
            self.reply(500, error("internal", "internal error"))
        finally:
            handling.request_id = handling.trace_id = handling.traceparent = None
            with State.lock:
                State.in_flight -= 1
            metrics.add("http_requests_total", {"route": route, "method": method, "status": str(status)})
            metrics.add("http_request_duration_seconds_sum", {"route": route}, round(time.monotonic() - started, 6))

    def route(self, method, path):
        if path == "/healthz" and method in ("GET", "HEAD"):
            return path, self.reply(200, {"status": "ok"})
        if path == "/readyz" and method in ("GET", "HEAD"):
            if State.draining:
                return path, self.reply(503, {"status": "draining"})
            return path, self.reply(200, {"status": "ready"})
        if path == "/metrics" and method in ("GET", "HEAD"):
            return path, self.reply_text(200, metrics.render(), "text/plain; version=0.0.4")
        if path == "/openapi.json" and method in ("GET", "HEAD"):
            return path, self.reply(200, OPENAPI)
        match = PRODUCT.match(path)
        if not match:
            return "unmatched", self.reply(404, error("not_found", "no such route"))
        template = "/api/reviews/{product_id}"
        product_id = match.group(1)
        if method in ("GET", "HEAD"):
            tag = reviews_tag(product_id)
            if none_match(self.headers.get("if-none-match"), tag):
                return template, self.reply_text(304, "", "application/json", etag=tag)
            return template, self.reply(200, product_reviews(product_id), etag=tag)
        if method == "POST":
            return template, self.add_review(product_id)
        return template, self.reply(405, error("method_not_allowed", f"{method} is not allowed here"))

    def add_review(self, product_id):
        if self.headers.get("transfer-encoding"):
            # http.server reads only by Content-Length: a chunked body left
            # unread would be taken for the next request on the connection.
            self.close_connection = True
            return self.reply(411, error("length_required", "send the review with a Content-Length"))
        # A review is a signed-in user's (the gateway's word, through
        # mTLS: anyone else's copy of the header was dropped above).
        user = self.headers.get(USER_PREFIX + "id")
        if not user:
            return self.reply(401, error("unauthenticated", "sign in to review a product"))
        if self.length > MAX_BODY:
            return self.reply(413, error("payload_too_large", f"the body is larger than {MAX_BODY} bytes"))
        raw = self.rfile.read(self.length)
        self.body_pending = False
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return self.reply(400, error("invalid_json", "the body is not JSON"))
        fields = []
        if not isinstance(body, dict):
            body = {}
            fields.append({"field": "body", "message": "must be a JSON object"})
        author = body.get("author")
        rating, text = body.get("rating"), body.get("text")
        if not isinstance(author, str) or not 1 <= len(author.strip()) <= 100:
            fields.append({"field": "author", "message": "must be 1 to 100 characters"})
        elif not is_unicode(author):
            fields.append({"field": "author", "message": UNPAIRED_SURROGATE})
        if not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 5:
            fields.append({"field": "rating", "message": "must be a whole number from 1 to 5"})
        if not isinstance(text, str) or not 1 <= len(text.strip()) <= 2000:
            fields.append({"field": "text", "message": "must be 1 to 2000 characters"})
        elif not is_unicode(text):
            fields.append({"field": "text", "message": UNPAIRED_SURROGATE})
        if fields:
            return self.reply(400, error("invalid_request", "the review is invalid", fields=fields))
        exists = product_exists(product_id)
        metrics.add("reviews_product_checks_total",
                    {"outcome": {True: "found", False: "unknown", None: "unavailable", "error": "error"}[exists]})
        if exists is None:
            return self.reply(503, error("catalog_unavailable",
                                         "the catalog cannot say whether the product exists; try again"),
                              retry_after=5)
        if exists == "error":
            return self.reply(502, error("catalog_error",
                                         "the catalog refused to say whether the product exists"))
        if not exists:
            return self.reply(404, error("unknown_product", f"there is no product {product_id}",
                                         fields=[{"field": "product_id", "message": "no such product"}]))
        created = now_rfc3339()
        # A user's second review of a product replaces the first, under a
        # new id: the list's tag (its count and last id) changes with it.
        cur = db().execute(
            "INSERT OR REPLACE INTO reviews (product_id, user_id, author, rating, text, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (product_id, user, author.strip(), rating, text.strip(), created))
        review = {"id": cur.lastrowid, "product_id": product_id, "author": author.strip(),
                  "rating": rating, "text": text.strip(), "created_at": created}
        return self.reply(201, review)

    def reply(self, status, body, etag=None, retry_after=None):
        return self.reply_text(status, json.dumps(body), "application/json", etag, retry_after)

    def reply_text(self, status, text, content_type, etag=None, retry_after=None):
        data = text.encode()
        self.send_response(status)
        if status != 304:  # a 304 has no body, and says nothing of one
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
        if etag:
            self.send_header("etag", etag)
        if retry_after is not None:
            self.send_header("retry-after", str(retry_after))
        self.send_header("x-served-by", INSTANCE)
        if State.draining or getattr(self, "body_pending", False):
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def log_message(self, fmt, *args):
        pass  # one line per request is in the metrics; errors are logged


class AtLimit(OSError):
    """No connection slot came free in one poll interval: the connection
    stays in the backlog, and serve_forever, to which get_request's
    OSError means "nothing accepted", looks at its shutdown flag and asks
    again."""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The kernel's backlog, as tokio's listener has it: connections wait
    # there while every slot is taken, instead of their SYNs being dropped
    # (socketserver's 5 would refuse a burst).
    request_queue_size = 1024
    # Waits for a slot are this long at most, so that shutdown() (which
    # waits for serve_forever's loop) is not held up by a full server.
    slot_wait = 0.5

    def __init__(self, *args, **kwargs):
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.at_limit = False  # whether the last wait for a slot was logged
        super().__init__(*args, **kwargs)

    def get_request(self):
        # A slot before the accept, released by shutdown_request when the
        # connection ends, whichever way it ends.
        if not self.slots.acquire(blocking=False):
            if not self.at_limit:
                self.at_limit = True
                log("WARN", "at the connection limit; new connections wait in the backlog",
                    limit=MAX_CONNECTIONS)
            if not self.slots.acquire(timeout=self.slot_wait):
                raise AtLimit("no connection slot free")
        else:
            self.at_limit = False
        try:
            sock, addr = self.socket.accept()
        except BaseException:
            self.slots.release()
            raise
        if identity is not None:
            try:
                # The handshake runs in the connection's own thread (setup).
                sock = identity.current().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except BaseException:
                sock.close()
                self.slots.release()
                raise
        return sock, addr

    def shutdown_request(self, request):
        # socketserver calls this once for every request get_request
        # returned: after its thread ends, or when it could not start one.
        try:
            super().shutdown_request(request)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if isinstance(e, (ssl.SSLError, ConnectionError, TimeoutError, OSError)):
            log("WARN", "refused a connection", peer=str(client_address), error=str(e))
        else:
            log("ERROR", "connection failed", peer=str(client_address), error=repr(e))


def main():
    migrate()
    host, port = LISTEN.rsplit(":", 1)
    server = Server((host.strip("[]"), int(port)), Handler)

    def drain(*_):
        if State.draining:
            return
        State.draining = True
        log("INFO", "draining in-flight requests", deadline=DRAIN_SECONDS)

        def stop():
            server.shutdown()
            server.server_close()  # refuse new connections: callers go elsewhere
            deadline = time.monotonic() + DRAIN_SECONDS
            while State.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            log("INFO", "stopped")
            os._exit(0)

        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    log("INFO", "listening", addr=LISTEN, tls=identity is not None,
        acl=acl.mode if acl else None)
    server.serve_forever()
    while True:  # the drain thread exits the process
        time.sleep(1)


if __name__ == "__main__":
    main()
