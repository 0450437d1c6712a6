"""Print N distinct free TCP ports on 127.0.0.1, chosen at random below the kernel's ephemeral range.

Ports from bind(("127.0.0.1", 0)) come from the ephemeral range, the same range that vLLM's own
internal sockets (ZMQ, torch.distributed) and every outgoing connection draw from during the minute or
two a server takes to start: a port picked there can be taken before the server binds it (seen: the
NIXL side-channel listener failed with EADDRINUSE and the engine hung). Below that range the kernel
assigns nothing by itself, so a port that is free now stays free for us.

    python free_ports.py N
"""

from __future__ import annotations

import random
import socket
import sys


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def main() -> None:
    count = int(sys.argv[1])
    high = min(ephemeral_low(), 65536) - 1
    low = 20000 if high > 21000 else 10000
    held: list[socket.socket] = []
    try:
        for port in random.sample(range(low, high), k=min(4000, high - low)):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            if len(held) == count:
                break
        if len(held) < count:
            raise SystemExit(f"only {len(held)} free ports found in {low}-{high}")
        print(" ".join(str(s.getsockname()[1]) for s in held))
    finally:
        for sock in held:
            sock.close()


if __name__ == "__main__":
    main()
