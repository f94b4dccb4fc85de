"""`python tcp_proxy.py LISTEN_PORT TARGET_PORT CONTROL_DIR`: forwards TCP connections on 127.0.0.1.

Tests put it between clients and the S3 server. While `CONTROL_DIR/down` exists the store is
out: every new connection is closed at once, unanswered, and counted as a line in
`CONTROL_DIR/dropped`, so a test can wait until the clients have met the outage (and retried)
before it removes `down` and ends it. The server's state is untouched throughout.
"""

import os
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


def main(listen_port: int, target_port: int, control: str) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(('127.0.0.1', listen_port))
    server.listen(64)
    with open(os.path.join(control, 'listening'), 'w'):
        pass
    while True:
        client, _ = server.accept()
        if os.path.exists(os.path.join(control, 'down')):
            client.close()
            with open(os.path.join(control, 'dropped'), 'a') as f:
                f.write('dropped\n')
            continue
        upstream = socket.create_connection(('127.0.0.1', target_port))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
