"""`python tcp_proxy.py LISTEN_PORT TARGET_PORT`: forwards TCP connections on 127.0.0.1.

Tests put it between clients and the S3 server; killing it is an outage (connections refused)
that leaves the server's state intact, and starting it again on the same port ends the outage.
"""

import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(listen_port: int, target_port: int) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(('127.0.0.1', listen_port))
    server.listen(64)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(('127.0.0.1', target_port))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]))
