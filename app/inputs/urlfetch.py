"""Images by URL without lending clients the server's place in the network.

Each hop of a fetch: ``parse_url``, the name resolved once and every address it
has checked against the ``FetchPolicy`` (``app.inputs.urlpolicy``), then a connection to
that checked address itself, with ``Host`` and TLS SNI carrying the name: nothing
resolves it a second time, so DNS rebinding has no window. Redirects are followed
by hand, at most ``MAX_REDIRECTS``, each hop checked like the first. No
environment proxies; connect, read and total time limits; reading stops once the
request's byte budget (``MAX_UPLOAD_MB``) is spent, whatever ``Content-Length`` said.

A client learns only that "the URL could not be fetched" (or that the image was
too large, which needs an allowed server that answered): which check refused,
what a name resolved to, whether a port was open and what the upstream said go
to the server log. Every failure reads alike, so the answers cannot map a
network (which ports are open, which names resolve), not even where
``URL_ALLOW_PRIVATE`` opens private addresses; the message names the public
address rule only where it applies.
"""

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from ipaddress import ip_address

import certifi
import httpx

from app.errors import BadRequestError, PayloadTooLargeError
from app.inputs.urlpolicy import FetchPolicy, IPAddress, UrlRefusedError, ip_literal, parse_url

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_REDIRECTS = 3
MAX_ADDRESSES_TRIED = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# identity: a compressed body could inflate past any limit (and is refused below)
_HEADERS = {"User-Agent": "maskrcnn-service", "Accept": "image/*", "Accept-Encoding": "identity"}


class InvalidUrlError(BadRequestError):
    code = "invalid_url"


class UrlFetchError(BadRequestError):
    code = "url_fetch_failed"


class ByteBudget:
    """The bytes all URL images of one request may bring in, together."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def ensure_room(self, count: int, name: str) -> None:
        if self.used + count > self.limit:
            raise PayloadTooLargeError(
                f"{name}: the images at the URLs are larger than the "
                f"{self.limit / 2**20:g} MB limit (MAX_UPLOAD_MB)"
            )

    def take(self, count: int, name: str) -> None:
        self.ensure_room(count, name)
        self.used += count


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address of ``host`` (the system resolver, in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


def default_transport() -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport(verify=_tls_context(), trust_env=False, retries=0)


class UrlFetcher:
    """``fetch(url)``: the body of an image URL under ``policy``. ``resolve`` and
    ``transport`` (a factory, called for every address tried) are the seams tests
    use to stand in for DNS and to watch every connection the fetcher asks for."""

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolve: Resolver = resolve_host,
        transport: Callable[[], httpx.AsyncBaseTransport] = default_transport,
    ):
        self.policy = policy
        self.resolve = resolve
        self.transport = transport

    def check_syntax(self, url: str, name: str) -> httpx.URL:
        try:
            return parse_url(url)
        except UrlRefusedError as e:
            raise InvalidUrlError(f"{name}: not an accepted URL: {e}") from None

    async def fetch(self, url: str, *, name: str, budget: ByteBudget | None = None) -> bytes:
        """Raises ``InvalidUrlError`` (400) for a URL that is wrong as written,
        ``UrlFetchError`` (400, one message for every cause) when it cannot be fetched,
        ``PayloadTooLargeError`` (413) when the body passes the budget."""
        parsed = self.check_syntax(url, name)
        budget = budget or ByteBudget(self.policy.max_bytes)
        policy = self.policy
        try:
            async with asyncio.timeout(policy.total_timeout_s):
                return await self._follow(parsed, budget, name)
        except (UrlRefusedError, httpx.HTTPError, OSError, UnicodeError) as e:
            if isinstance(e, TimeoutError):  # the total deadline (asyncio.timeout)
                reason = f"took longer than {policy.total_timeout_s:g} s"
            else:
                reason = str(e) or type(e).__name__
            shown = str(parsed.copy_with(query=None, fragment=None))  # no signed-URL secrets
            log.warning("%s: URL %s not fetched: %s", name, shown, reason)
            kind = "an" if policy.allow_private else "a public"
            raise UrlFetchError(
                f"{name}: the URL could not be fetched (it must be {kind} http(s) URL "
                "that answers with an image in time)"
            ) from None

    async def _follow(self, url: httpx.URL, budget: ByteBudget, name: str) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            if hop:
                url = parse_url(str(url))
            answer = await self._get(url, budget, name)
            if isinstance(answer, bytes):
                return answer
            url = answer
        raise UrlRefusedError(f"more than {MAX_REDIRECTS} redirects")

    async def _checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """``host``'s addresses, once; refused whole if any one of them is refused
        (a name must not smuggle a private address in beside a public one)."""
        literal = ip_literal(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                found = [ip_address(a.split("%", 1)[0]) for a in await self.resolve(host, port)]
            except ValueError as e:
                raise UrlRefusedError(f"{host} resolved to something odd ({e})") from None
        if not found:
            raise UrlRefusedError(f"{host} has no address")
        for address in found:
            if (why := self.policy.refusal(host, address, port)) is not None:
                raise UrlRefusedError(f"{host}:{port} refused: {why}")
        return found

    async def _get(self, url: httpx.URL, budget: ByteBudget, name: str) -> bytes | httpx.URL:
        """One hop: the body, or the URL a redirect points to."""
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = (await self._checked_addresses(host, port))[:MAX_ADDRESSES_TRIED]
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError, httpx.ConnectTimeout):
                return await self._send(url, address, budget, name)
        return await self._send(url, addresses[-1], budget, name)

    def _client(self) -> httpx.AsyncClient:
        policy = self.policy
        timeout = httpx.Timeout(
            connect=policy.connect_timeout_s,
            read=policy.read_timeout_s,
            write=policy.read_timeout_s,
            pool=policy.connect_timeout_s,
        )
        return httpx.AsyncClient(
            transport=self.transport(),
            trust_env=False,
            follow_redirects=False,
            timeout=timeout,
            headers=_HEADERS,
        )

    async def _send(
        self, url: httpx.URL, address: IPAddress, budget: ByteBudget, name: str
    ) -> bytes | httpx.URL:
        """GET ``url`` from the checked ``address``: the URL names the address, so
        nothing resolves the name again; ``Host`` and SNI keep the name (and TLS
        certificates are checked against it).

        A client (and connection pool) of its own, closed when the answer is read:
        the pool keys connections by the address alone, so a shared one would carry
        a redirect to another name on the same address over the TLS session opened
        for the first name, whose certificate was never checked against the second."""
        host = url.raw_host.decode("ascii")
        headers = {"Host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if ip_literal(host) is None else {}
        target = url.copy_with(host=str(address))
        async with (
            self._client() as client,
            client.stream("GET", target, headers=headers, extensions=extensions) as response,
        ):
            return await self._read(response, url, budget, name)

    async def _read(
        self, response: httpx.Response, url: httpx.URL, budget: ByteBudget, name: str
    ) -> bytes | httpx.URL:
        status = response.status_code
        if status in _REDIRECTS and "location" in response.headers:
            return url.join(response.headers["location"])
        if not response.is_success:
            raise UrlRefusedError(f"HTTP {status}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UrlRefusedError(f"Content-Encoding {encoding!r}")  # never inflate a bomb
        declared = response.headers.get("content-length", "")
        if declared.isdigit():
            budget.ensure_room(int(declared), name)  # refuse early; the count below decides
        chunks = []
        async for chunk in response.aiter_raw():
            budget.take(len(chunk), name)
            chunks.append(chunk)
        return b"".join(chunks)

