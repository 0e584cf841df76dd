"""A TCP proxy in front of PostgreSQL that refuses, stalls and recovers: the
database faults of the tests that need one."""

import contextlib
import socket
import threading
import time


class FaultyProxy:
    """TCP to PostgreSQL, in one of three modes: ``pass`` forwards; ``refuse``
    closes each new connection at once; ``stall`` accepts and forwards nothing,
    on new and open connections alike (a database that hangs). ``heal`` drops
    the stalled connections and passes again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.mode = "pass"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                while self.mode == "stall":  # hold what came until healed (or dropped)
                    time.sleep(0.05)
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def drop_connections(self) -> None:
        with self.lock:
            dropped, self.open = self.open, []
        for end in dropped:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
                end.close()

    def heal(self) -> None:
        self.drop_connections()
        self.mode = "pass"

    def close(self) -> None:
        self.listener.close()
        self.drop_connections()
