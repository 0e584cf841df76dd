"""The compose topology without Docker: ``deploy/nginx.conf``, the file
the compose ``nginx`` service runs, rendered for loopback in front of local
``maskrcnn serve`` processes. The topology test uses it; so can a person:

    python -m deploy.topology --listen 8080 --replica 8001 --replica 8002 --prefix /tmp/lb
    nginx -p /tmp/lb/ -c /tmp/lb/nginx.conf -e stderr -g 'daemon off;'

Only addresses and paths change; every proxy setting is the production one, so
the test exercises what is deployed.
"""

import argparse
import os
import re
import shutil
from pathlib import Path

NGINX_CONF = Path(__file__).with_name("nginx.conf")
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

_USER = re.compile(r"^user\s+\S+;\n", re.M)
_PID = re.compile(r"^pid\s+\S+;$", re.M)
_LISTEN = re.compile(r"^(\s*)listen\s+80;$", re.M)
_SERVER = re.compile(r"^(\s*)server\s+api:8000\s+resolve\b([^;]*);$", re.M)
_HTTP = re.compile(r"^http \{\n", re.M)


class RenderError(ValueError):
    """``nginx.conf`` no longer has a line the renderer swaps."""


def _sub(pattern: re.Pattern, replacement, text: str, *, expected: int | None = 1) -> str:
    result, count = pattern.subn(replacement, text)
    if count == 0 or (expected is not None and count != expected):
        raise RenderError(
            f"{NGINX_CONF.name}: expected {expected or 'some'} line(s) matching "
            f"{pattern.pattern!r}, found {count}"
        )
    return result


def render_nginx_conf(
    text: str, *, replica_ports: list[int], listen_port: int, prefix: Path
) -> str:
    """``text`` (``nginx.conf``) with upstreams on ``127.0.0.1:<replica_ports>``,
    listening on ``127.0.0.1:<listen_port>``, pid and temp files under ``prefix``.

    As root the workers run as root too: nginx's default (``nobody``) could not
    write the temp dirs of a private test folder."""
    if not replica_ports:
        raise ValueError("at least one replica port")
    user = "user root;\n" if os.geteuid() == 0 else ""  # without root, `user` is ignored
    text = _sub(_USER, user, text)
    text = _sub(_PID, f"pid {prefix / 'nginx.pid'};", text)
    text = _sub(_LISTEN, rf"\1listen 127.0.0.1:{listen_port};", text)

    def servers(match: re.Match) -> str:
        indent, params = match.group(1), match.group(2)
        return "\n".join(f"{indent}server 127.0.0.1:{port}{params};" for port in replica_ports)

    text = _sub(_SERVER, servers, text, expected=None)
    temp = "".join(f"    {name}_temp_path {prefix / 'temp' / name};\n" for name in TEMP_DIRS)
    return _sub(_HTTP, lambda m: m.group(0) + temp, text)


def write_config(prefix: Path, *, replica_ports: list[int], listen_port: int) -> Path:
    """Render into ``prefix/nginx.conf`` (creating the temp folders); its path."""
    prefix.mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_nginx_conf(
            NGINX_CONF.read_text(),
            replica_ports=replica_ports,
            listen_port=listen_port,
            prefix=prefix,
        )
    )
    return conf


def find_nginx() -> str | None:
    """``nginx`` on ``PATH``, else Debian's ``/usr/sbin/nginx`` (not on a user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def nginx_command(nginx: str, prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground, logging errors to stderr from the first line on
    (before the config is read it would open the compiled-in log path)."""
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.topology",
        description="Render deploy/nginx.conf for local replicas and print how to run it.",
    )
    parser.add_argument("--listen", type=int, required=True, help="port nginx listens on")
    parser.add_argument(
        "--replica", type=int, action="append", required=True, help="a replica's port (repeat)"
    )
    parser.add_argument("--prefix", type=Path, required=True, help="folder for config and temp")
    args = parser.parse_args(argv)
    prefix = args.prefix.resolve()
    conf = write_config(prefix, replica_ports=args.replica, listen_port=args.listen)
    command = nginx_command(find_nginx() or "nginx", prefix, conf)
    print(" ".join(c if " " not in c else repr(c) for c in command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
