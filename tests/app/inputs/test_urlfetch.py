"""URL input: which URLs are fetched, how, and what a client learns.

Every test watches connections two ways: a recording transport sees each request
the fetcher asks for (and never lets one leave for an address other than
127.0.0.1), and trap servers on 127.0.0.1 count the connections they accept. DNS
is a stand-in resolver (this machine has no network); ``localhost`` goes to the
real one, which answers from /etc/hosts.
"""

import asyncio
import base64
import contextlib
import gzip
import http.server
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from app.api.deps import get_url_fetcher
from app.errors import PayloadTooLargeError
from app.inputs import urlfetch
from app.inputs.urlfetch import (
    MAX_REDIRECTS,
    ByteBudget,
    InvalidUrlError,
    UrlFetcher,
    UrlFetchError,
    resolve_host,
)
from app.inputs.urlpolicy import Allowlist, FetchPolicy, ip_literal, is_public
from tests.app.conftest import fake_client, png_bytes

PUBLIC_IP = "93.184.216.34"  # looks public; the test transport maps it to 127.0.0.1
GENERIC = "the URL could not be fetched"
IMAGE = png_bytes(np.full((24, 32, 3), 120, dtype=np.uint8))
GZIPPED = gzip.compress(IMAGE)
BAD_LOCATIONS = ("http://[::1", "//[zz]/image", "http://\x01x/image", "http://a b/")  # no URLs


# -- servers on 127.0.0.1 --------------------------------------------------------


class Trap:
    """A listening socket that nothing should reach; ``connections()`` counts
    the connections the kernel completed for it (accepted or not)."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.socket.setblocking(False)
        self.port = self.socket.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.socket.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.socket.close()


class ImageServer(http.server.ThreadingHTTPServer):
    """``/image``; ``/hop/N`` redirects N times, then serves the image; ``/to?url``
    redirects there; ``/big/N`` N bytes with Content-Length, ``/chunked/N``
    without; ``/lie/N`` declares N bytes and sends the image and 4N more; ``/drip`` a byte a second;
    ``/drip-headers`` its headers a byte every half second; ``/bad-location/N`` redirects
    to ``BAD_LOCATIONS[N]`` as is; ``/gzip`` the image gzipped with Content-Encoding;
    ``/missing`` 404. ``hits`` lists the paths asked for, ``hosts`` their Host,
    ``peers`` the client end of the connection each came over. With ``tls``, HTTPS."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        self.hits: list[str] = []
        self.hosts: list[str] = []
        self.peers: list[tuple[str, int]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        self.server.hosts.append(self.headers.get("Host", ""))
        self.server.peers.append(self.client_address)
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if parts[0] == "image":
                self.answer(200, IMAGE)
            elif parts[0] == "hop":
                n = int(parts[1])
                if n:
                    self.redirect(f"/hop/{n - 1}")
                else:
                    self.answer(200, IMAGE)
            elif parts[0] == "to":
                self.redirect(query)
            elif parts[0] == "big":
                self.answer(200, b"x" * int(parts[1]))
            elif parts[0] == "chunked":
                self.chunked(int(parts[1]))
            elif parts[0] == "lie":
                self.answer(200, IMAGE + b"x" * (4 * int(parts[1])), length=int(parts[1]))
            elif parts[0] == "drip":
                self.drip()
            elif parts[0] == "drip-headers":
                self.drip_headers()
            elif parts[0] == "gzip":
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(GZIPPED)))
                self.end_headers()
                self.wfile.write(GZIPPED)
            elif parts[0] == "bad-location":
                self.redirect(BAD_LOCATIONS[int(parts[1])])
            else:
                self.answer(404, b"secret upstream body")

    def answer(self, status: int, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def chunked(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, size, 4096):
            part = b"x" * min(4096, size - start)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(1)

    def drip_headers(self) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Slow: " + b"x" * 100:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.5)


@pytest.fixture
def trap() -> Iterator[Trap]:
    trap = Trap()
    yield trap
    trap.close()


@pytest.fixture
def images() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


# -- the stand-ins for DNS and for the network -------------------------------------


class Resolver:
    """Names to addresses from a table; ``localhost`` from the system resolver."""

    def __init__(self, table: dict[str, list[str]] | None = None):
        self.table = table or {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host == "localhost":
            return await resolve_host(host, port)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


class Network(httpx.AsyncBaseTransport):
    """Records every request a fetcher sends. Forwards to 127.0.0.1 only: the
    address itself, or ``(PUBLIC_IP, port)`` pairs mapped in ``routes``; any other
    address gets a ConnectError, so a test can never reach out."""

    def __init__(self, routes: dict[tuple[str, int], int] | None = None):
        self.routes = routes or {}
        self.requests: list[httpx.Request] = []

    def __call__(self) -> httpx.AsyncBaseTransport:
        return self  # the fetcher's transport factory

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        host, port = request.url.host, request.url.port or 80
        url = request.url
        if (host, port) in self.routes:
            url = url.copy_with(host="127.0.0.1", port=self.routes[host, port])
        elif host != "127.0.0.1":
            raise httpx.ConnectError(f"test network: no route to {host}")
        forwarded = httpx.Request(request.method, url, headers=request.headers)
        async with httpx.AsyncHTTPTransport(trust_env=False) as real:
            response = await real.handle_async_request(forwarded)
            body = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, stream=Body(body))

    async def aclose(self) -> None:
        pass

    @property
    def hosts(self) -> list[str]:
        return [r.url.host for r in self.requests]


class Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self):
        yield self.data


def make_fetcher(resolver=None, network=None, **policy) -> UrlFetcher:
    policy = FetchPolicy(**{"max_bytes": 1 << 20, "total_timeout_s": 5.0, **policy})
    return UrlFetcher(policy, resolve=resolver or Resolver(), transport=network or Network())


def fetch(fetcher: UrlFetcher, url: str, budget: ByteBudget | None = None) -> bytes:
    return asyncio.run(fetcher.fetch(url, name="images[0]", budget=budget))


# -- refused before any connection --------------------------------------------------

REFUSED = [
    "http://127.0.0.1:{port}/image",
    "http://localhost:{port}/image",
    "http://0:{port}/image",
    "http://0.0.0.0:{port}/image",
    "http://127.1:{port}/image",
    "http://2130706433:{port}/image",
    "http://0x7f000001:{port}/image",
    "http://0x7f.1:{port}/image",
    "http://017700000001:{port}/image",
    "http://127.0.0.1.:{port}/image",
    "http://[::1]:{port}/image",
    "http://[::ffff:127.0.0.1]:{port}/image",
    "http://[::ffff:7f00:1]:{port}/image",
    "http://[::]:{port}/image",
    "http://[2002:7f00:1::1]:{port}/image",  # 6to4 around 127.0.0.1
    "http://[64:ff9b::a00:1]:{port}/image",  # NAT64 around 10.0.0.1
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.64.0.1/image",
    "http://100.100.100.200/latest/meta-data/",
    "http://10.0.0.1/image",
    "http://172.16.5.4/image",
    "http://192.168.1.1/image",
    "http://224.0.0.1/image",
    "http://240.0.0.1/image",
    "http://255.255.255.255/image",
    "http://[fe80::1]/image",
    "http://[fc00::1]/image",
    "http://internal.example:{port}/image",  # resolves to 127.0.0.1
    "http://corp.example/image",  # resolves to 10.0.0.1
    "http://mixed.example/image",  # a public and a private address
    "http://Internal.Example.:{port}/image",
]
NAMES = {
    "internal.example": ["127.0.0.1"],
    "corp.example": ["10.0.0.1"],
    "mixed.example": [PUBLIC_IP, "10.1.2.3"],
}


@pytest.mark.parametrize("template", REFUSED)
def test_refused_addresses_never_get_a_connection(template, trap, caplog):
    url = template.format(port=trap.port)
    network = Network(routes={(PUBLIC_IP, 80): trap.port})
    # the trap's port is allowed, so only the address can be what refuses
    fetcher = make_fetcher(Resolver(NAMES), network, ports=frozenset({80, 443, trap.port}))
    with caplog.at_level(logging.WARNING), pytest.raises(UrlFetchError) as refused:
        fetch(fetcher, url)
    assert network.requests == [] and trap.connections() == 0
    assert refused.value.code == "url_fetch_failed" and refused.value.status_code == 400
    assert refused.value.message.startswith(f"images[0]: {GENERIC}")
    for leak in ("127.", "10.", str(trap.port), "private", "refused", "resolve"):
        assert leak not in refused.value.message
    assert "is not a public address" in caplog.text  # the reason goes to the log


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://images.example/a.png",
        "gopher://images.example/",
        "http://user:secret@images.example/a.png",
        "http://user@images.example/a.png",
        "http://@images.example/a.png",
        "http://images.example\\@127.0.0.1/a.png",
        "//images.example/a.png",
        "http:/a.png",
        "http://images example/a.png",
        "http://%31%32%37.0.0.1/a.png",
        "http://[::1%25lo]/a.png",
        "http://images.example:99999/a.png",
        "http://" + "a" * 5000 + ".example/",
    ],
)
def test_other_schemes_credentials_and_odd_hosts_are_refused_as_written(url, trap):
    resolver, network = Resolver({"images.example": [PUBLIC_IP]}), Network()
    with pytest.raises(InvalidUrlError) as refused:
        fetch(make_fetcher(resolver, network), url)
    assert refused.value.code == "invalid_url" and refused.value.status_code == 400
    assert resolver.calls == [] and network.requests == [] and trap.connections() == 0


def test_legacy_ipv4_spellings_are_read_as_the_address_they_mean():
    for spelling in ("127.1", "2130706433", "0x7f000001", "017700000001", "0x7f.0.0.1"):
        assert str(ip_literal(spelling)) == "127.0.0.1"
    assert str(ip_literal("0")) == "0.0.0.0"
    assert ip_literal("images.example") is None and ip_literal("cafe") is None


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        (PUBLIC_IP, True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("0.0.0.0", False),
        ("10.255.0.1", False),
        ("100.127.255.254", False),
        ("169.254.169.254", False),
        ("192.0.0.170", False),
        ("198.18.0.1", False),
        ("224.0.0.251", False),
        ("::1", False),
        ("::", False),
        ("::ffff:169.254.169.254", False),
        ("2002:a9fe:a9fe::1", False),  # 6to4 around 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo client 127.0.0.1
        ("64:ff9b::7f00:1", False),
        ("ff02::1", False),
    ],
)
def test_is_public(address, public):
    assert is_public(ip_literal(address)) is public


# -- what is fetched, and how ------------------------------------------------------


def test_a_public_url_is_fetched_from_the_checked_address_under_its_name(images, trap):
    flips = iter([[PUBLIC_IP], ["127.0.0.1"]])  # a rebinding DNS answer for the 2nd ask

    class Rebinding(Resolver):
        async def __call__(self, host, port):
            self.calls.append(host)
            return next(flips)

    resolver, network = Rebinding(), Network(routes={(PUBLIC_IP, 80): images.port})
    body = fetch(make_fetcher(resolver, network), "http://Images.Example/image")
    assert body == IMAGE
    assert resolver.calls == ["images.example"]  # resolved once, then the address is used
    assert network.hosts == [PUBLIC_IP]
    assert images.hosts == ["images.example"]  # the name travels in Host
    assert trap.connections() == 0


def test_https_connects_to_the_address_with_the_name_as_sni():
    network = Network()  # no route: the recorded request is all there is
    with pytest.raises(UrlFetchError):
        fetch(
            make_fetcher(Resolver({"images.example": [PUBLIC_IP]}), network),
            "https://images.example/a.png",
        )
    [request] = network.requests
    assert request.url.host == PUBLIC_IP and request.url.scheme == "https"
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"


def test_environment_proxies_are_ignored(images, trap, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{trap.port}")
    network = Network(routes={(PUBLIC_IP, 80): images.port})
    fetcher = make_fetcher(Resolver({"images.example": [PUBLIC_IP]}), network)
    assert fetch(fetcher, "http://images.example/image") == IMAGE
    assert trap.connections() == 0


def test_other_ports_need_the_allowlist_or_a_private_opening(images):
    network = Network(routes={(PUBLIC_IP, 8080): images.port})
    names = Resolver({"images.example": [PUBLIC_IP]})
    with pytest.raises(UrlFetchError):
        fetch(make_fetcher(names, network), "http://images.example:8080/image")
    assert network.requests == []
    listed = make_fetcher(names, network, allowlist=Allowlist.parse(["images.example"]))
    assert fetch(listed, "http://images.example:8080/image") == IMAGE


def test_a_redirect_to_a_private_address_is_refused(images, trap):
    network = Network(routes={(PUBLIC_IP, 80): images.port})
    names = Resolver({"images.example": [PUBLIC_IP], "internal.example": ["127.0.0.1"]})
    fetcher = make_fetcher(names, network, ports=frozenset({80, 443, trap.port}))
    for target in (
        f"http://127.0.0.1:{trap.port}/image",
        f"http://internal.example:{trap.port}/image",
        f"http://2130706433:{trap.port}/image",
        "file:///etc/passwd",
        f"http://user:pw@127.0.0.1:{trap.port}/",
    ):
        network.requests.clear()
        with pytest.raises(UrlFetchError, match=GENERIC):
            fetch(fetcher, f"http://images.example/to?{target}")
        assert network.hosts == [PUBLIC_IP]  # the first hop, nothing after it
    assert trap.connections() == 0


def test_at_most_three_redirects_each_checked(images):
    network = Network(routes={(PUBLIC_IP, 80): images.port})
    fetcher = make_fetcher(Resolver({"images.example": [PUBLIC_IP]}), network)
    assert fetch(fetcher, f"http://images.example/hop/{MAX_REDIRECTS}") == IMAGE
    assert images.hits == ["/hop/3", "/hop/2", "/hop/1", "/hop/0"]
    images.hits.clear()
    with pytest.raises(UrlFetchError, match=GENERIC):
        fetch(fetcher, f"http://images.example/hop/{MAX_REDIRECTS + 1}")
    assert images.hits == ["/hop/4", "/hop/3", "/hop/2", "/hop/1"]  # the 5th never asked


class Draining(httpx.AsyncBaseTransport):
    """``default_transport`` that reads every body in full before handing the
    response on, so each connection goes back to its pool idle and reusable (the
    fetcher itself drops a redirect's connection unread, which hides a shared pool)."""

    def __init__(self):
        self.real = urlfetch.default_transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.real.handle_async_request(request)
        body = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, stream=Body(body))

    async def aclose(self) -> None:
        await self.real.aclose()


TRANSPORTS = {"default": urlfetch.default_transport, "draining": Draining}
TWO_NAMES = {"a.example": ["127.0.0.1"], "b.example": ["127.0.0.1"]}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_hop_gets_a_connection_of_its_own(images, transport):
    """Two names on one address: the redirect to the second name must not ride the
    keep-alive connection opened for the first (with TLS, that connection's
    certificate was only ever checked against the first name)."""
    policy = FetchPolicy(max_bytes=1 << 20, allow_private=True)
    fetcher = UrlFetcher(policy, resolve=Resolver(TWO_NAMES), transport=TRANSPORTS[transport])
    second = f"http://b.example:{images.port}/image"
    assert fetch(fetcher, f"http://a.example:{images.port}/to?{second}") == IMAGE
    assert images.hosts == [f"a.example:{images.port}", f"b.example:{images.port}"]
    assert len(set(images.peers)) == 2  # two TCP connections: nothing was reused


def certificate(tmp_path, *names: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for ``names``: the server's context, and a client
    context that trusts that certificate alone."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    alt_names = ",".join(f"DNS:{name}" for name in names)
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={names[0]}"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert), "-addext", f"subjectAltName={alt_names}"),
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("second_name_in_cert", [False, True])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_redirect_to_another_name_on_the_same_address_checks_its_certificate(
    tmp_path, monkeypatch, caplog, second_name_in_cert, transport
):
    """``a.example`` and ``b.example`` share 127.0.0.1; the certificate always names
    ``a.example``. The hop to ``b.example`` must do its own TLS handshake, with SNI
    ``b.example``, and be refused when the certificate does not name it."""
    names = ("a.example", "b.example") if second_name_in_cert else ("a.example",)
    server_tls, client_tls = certificate(tmp_path, *names)
    monkeypatch.setattr(urlfetch, "_tls_context", lambda: client_tls)  # trusts this cert alone
    server = ImageServer(tls=server_tls)
    try:
        policy = FetchPolicy(max_bytes=1 << 20, allow_private=True)
        fetcher = UrlFetcher(policy, resolve=Resolver(TWO_NAMES), transport=TRANSPORTS[transport])
        url = f"https://a.example:{server.port}/to?https://b.example:{server.port}/image"
        if second_name_in_cert:
            assert fetch(fetcher, url) == IMAGE
            assert server.hosts == [f"a.example:{server.port}", f"b.example:{server.port}"]
            assert len(set(server.peers)) == 2
        else:
            with caplog.at_level(logging.WARNING), pytest.raises(UrlFetchError, match=GENERIC):
                fetch(fetcher, url)
            assert server.hits == [f"/to?https://b.example:{server.port}/image"]
            assert "certificate verify failed" in caplog.text and "b.example" in caplog.text
    finally:
        server.close()


def test_a_malformed_redirect_location_is_the_generic_400(images):
    """Such a Location is no URL (``url.join`` would raise ``InvalidURL``, which is no
    ``HTTPError``): it must be the one generic answer, never an unhandled 500."""
    network = Network(routes={(PUBLIC_IP, 80): images.port})
    fetcher = make_fetcher(Resolver({"images.example": [PUBLIC_IP]}), network)
    for n in range(len(BAD_LOCATIONS)):
        network.requests.clear()
        with pytest.raises(UrlFetchError, match=GENERIC):
            fetch(fetcher, f"http://images.example/bad-location/{n}")
        assert network.hosts == [PUBLIC_IP]  # the first hop, nothing after it


# -- size and time limits -------------------------------------------------------------


def local(**policy) -> UrlFetcher:
    """A fetcher that may reach 127.0.0.1 (URL_ALLOW_PRIVATE), with the real
    resolver and the real transport."""
    policy = FetchPolicy(**{"max_bytes": 10_000, "allow_private": True, **policy})
    return UrlFetcher(policy)


@pytest.mark.parametrize("kind", ["big", "chunked"])
def test_a_body_over_the_limit_is_413(images, kind):
    fetcher = local()
    assert len(fetch(fetcher, f"http://127.0.0.1:{images.port}/{kind}/10000")) == 10_000
    started = time.monotonic()
    with pytest.raises(PayloadTooLargeError, match="MAX_UPLOAD_MB"):
        fetch(fetcher, f"http://127.0.0.1:{images.port}/{kind}/10001")
    with pytest.raises(PayloadTooLargeError):
        fetch(fetcher, f"http://127.0.0.1:{images.port}/{kind}/50000000")  # stops early
    assert time.monotonic() - started < 5


def test_a_lying_content_length_is_not_believed_past_its_own_count(images):
    """HTTP/1.1 framing ends the body at the declared length: the extra bytes are
    never read (and the truncated image is then a 400 of its own)."""
    body = fetch(local(), f"http://127.0.0.1:{images.port}/lie/5000")
    assert body == (IMAGE + b"x" * 20_000)[:5000]


def test_an_encoded_body_is_refused_never_inflated(images):
    """``Accept-Encoding: identity`` is asked for; a server that compresses anyway is
    refused (inflating would let a small body pass every size limit)."""
    with pytest.raises(UrlFetchError, match=GENERIC):
        fetch(local(), f"http://127.0.0.1:{images.port}/gzip")
    assert fetch(local(), f"http://127.0.0.1:{images.port}/image") == IMAGE


def test_the_budget_is_shared_by_the_urls_of_one_request(images):
    budget, fetcher = ByteBudget(15_000), local(max_bytes=15_000)
    fetch(fetcher, f"http://127.0.0.1:{images.port}/big/10000", budget)
    with pytest.raises(PayloadTooLargeError):
        fetch(fetcher, f"http://127.0.0.1:{images.port}/chunked/10000", budget)


@pytest.mark.parametrize("path", ["drip", "drip-headers"])
def test_a_dripping_server_is_cut_off_at_the_total_deadline(images, caplog, path):
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(UrlFetchError, match=GENERIC):
        fetch(local(total_timeout_s=1.5), f"http://127.0.0.1:{images.port}/{path}")
    assert 1.4 < time.monotonic() - started < 3.5
    assert "took longer than 1.5 s" in caplog.text


def test_upstream_errors_and_closed_ports_look_alike(images, trap):
    closed = trap.port
    trap.close()  # nothing listens there now
    answers = []
    for url in (
        f"http://127.0.0.1:{images.port}/missing",
        f"http://127.0.0.1:{closed}/image",
        "http://no-such-name.example/image",  # the stand-in resolver knows no name
    ):
        with pytest.raises(UrlFetchError) as failed:
            fetcher = local()
            fetch(UrlFetcher(fetcher.policy, resolve=Resolver()), url)
        answers.append(failed.value.message)
    assert len(set(answers)) == 1 and "secret" not in answers[0]
    # private addresses are open here: the message does not blame the address
    assert "(it must be an http(s) URL that answers with an image in time)" in answers[0]


def test_with_the_default_policy_the_message_names_the_public_address_rule():
    fetcher = make_fetcher(Resolver({"internal.example": ["127.0.0.1"]}))
    with pytest.raises(UrlFetchError) as refused:
        fetch(fetcher, "http://internal.example/image")
    assert "(it must be a public http(s) URL that answers with an image in time)" in str(
        refused.value.message
    )


def test_allowlist_entries():
    allow = Allowlist.parse(["images.example", "*.cdn.example", "10.1.0.0/16", "fd00::/8"])
    policy = FetchPolicy(max_bytes=1, allowlist=allow)
    assert policy.refusal("images.example", ip_literal("127.0.0.1"), 8080) is None
    assert policy.refusal("a.b.cdn.example", ip_literal("10.9.9.9"), 80) is None
    assert policy.refusal("cdn.example", ip_literal("10.9.9.9"), 80) is not None
    assert policy.refusal("evilcdn.example", ip_literal("10.9.9.9"), 80) is not None
    assert policy.refusal("x.example", ip_literal("10.1.2.3"), 9000) is None
    assert policy.refusal("x.example", ip_literal("fd00::5"), 80) is None
    assert policy.refusal("x.example", ip_literal("10.2.0.1"), 80) is not None
    assert policy.refusal("x.example", ip_literal(PUBLIC_IP), 80) is None
    assert policy.refusal("x.example", ip_literal(PUBLIC_IP), 8080) is not None
    for bad in ("bad host", "*", "http://x.example", "1.2.3.4/40"):
        with pytest.raises(ValueError, match="expected a host name"):
            Allowlist.parse([bad])


# -- through the API -------------------------------------------------------------------


def post_urls(client, *urls, **options):
    images = [{"url": url} for url in urls]
    return client.post("/v1/segment/json", json={"images": images, **options})


def test_with_url_allow_private_a_local_image_is_fetched_and_segmented(images):
    with fake_client(url_allow_private=True) as client:
        data = base64.b64encode(png_bytes(np.full((24, 32, 3), 200, np.uint8))).decode()
        body = {"images": [{"url": f"http://127.0.0.1:{images.port}/image"}, {"data": data}]}
        response = client.post("/v1/segment/json", json={**body, "score_threshold": 0})
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert (first["width"], first["height"]) == (32, 24)
    assert first["detections"][0]["score"] == pytest.approx(120 / 255)  # the served pixels
    assert second["detections"][0]["score"] == pytest.approx(200 / 255)
    assert images.hits == ["/image"]


def test_by_default_a_local_url_is_a_400_that_says_nothing_about_it(images):
    with fake_client() as client:
        response = post_urls(client, f"http://127.0.0.1:{images.port}/image")
        listed = post_urls(client, "http://127.0.0.1:1/image")  # nothing listens there
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "url_fetch_failed"
    assert error["message"] == listed.json()["error"]["message"]
    assert error["message"].startswith(f"images[0]: {GENERIC}")
    assert images.hits == []


def test_limits_through_the_api(images):
    with fake_client(url_allow_private=True, max_upload_mb=0.01, url_total_timeout_s=1) as client:
        too_big = post_urls(client, f"http://127.0.0.1:{images.port}/chunked/20000")
        started = time.monotonic()
        drip = post_urls(client, f"http://127.0.0.1:{images.port}/drip")
        drip_s = time.monotonic() - started
        lie = post_urls(client, f"http://127.0.0.1:{images.port}/lie/50")
        bad = post_urls(client, "ftp://127.0.0.1/image")
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    assert drip.status_code == 400 and drip.json()["error"]["code"] == "url_fetch_failed"
    assert drip_s < 3
    assert lie.status_code == 400 and lie.json()["error"]["code"] == "invalid_image"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_url"
    assert "http or https" in bad.json()["error"]["message"]


def test_one_failing_url_cancels_the_other_fetches(images):
    with fake_client(url_allow_private=True, url_total_timeout_s=30) as client:
        started = time.monotonic()
        response = post_urls(
            client,
            f"http://127.0.0.1:{images.port}/drip",
            f"http://127.0.0.1:{images.port}/missing",
        )
    assert response.status_code == 400 and time.monotonic() - started < 5


def test_the_fetcher_dependency_follows_the_settings():
    from app.settings import load_settings

    settings = load_settings(
        url_allow_private=True, url_allowlist="images.example", url_total_timeout_s=3
    )
    policy = get_url_fetcher(settings).policy
    assert policy.allow_private and policy.total_timeout_s == 3
    assert policy.allowlist.names == {"images.example"}
    assert policy.max_bytes == settings.max_upload_bytes
