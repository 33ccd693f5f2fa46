"""Network helpers for tests: all on loopback."""

import socket
import threading
import time


class SlowLink:
    """A loopback TCP relay that delivers the server's replies (and with both_ways, the
    client's data too) at ``rate`` bytes per second: a slow network between the worker and a
    database, so a backup or a restore lasts long enough to be watched — or interrupted."""

    def __init__(self, target_port: int, rate: int, both_ways: bool = False):
        self.target_port = target_port
        self.rate = rate
        self.both_ways = both_ways  # also throttle what the client sends (a restore's data)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is down (a restart): refuse this client, keep serving
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, self.rate if self.both_ways else None),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: int | None):
        started, sent = time.monotonic(), 0
        try:
            while chunk := src.recv(16384):
                dst.sendall(chunk)
                if rate:
                    sent += len(chunk)
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.closed = True
        self.listener.close()
