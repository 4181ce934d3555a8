"""
netd's smtp kind against an aiosmtpd sink, same client, same run.

    python bench/smtp_bench.py [--rounds 3] [--duration 5] [--conns 4] [--size 10240]

Each round starts every server fresh on a free loopback port (in a rotated
order) and sends 10 KiB messages over N concurrent smtplib connections (one
client process, a thread per connection, one EHLO per connection) for the
duration.  netd runs in capture mode and fsyncs every message before its 250;
aiosmtpd's Sink handler keeps nothing.  After every capture round, relay rounds
measure the end-to-end relay rate: netd in smarthost mode in front of an
aiosmtpd sink, from the first message sent until netd's queue is empty.
Servers run on CPU 1 and the client on CPU 0 when taskset exists.  Prints
medians, netd's ratio to aiosmtpd within each round, and peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _bench
from _bench import VENV_BIN, accepts, cpu_seconds, free_port, proc_mib, wait_for


def pinned(cpu: int, enabled: bool) -> list[str]:
    return _bench.pinned(cpu) if enabled else []


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def aiosmtpd(port: int, pin: bool) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
    command += ["-c", "aiosmtpd.handlers.Sink"]
    return subprocess.Popen(pinned(1, pin) + command, stdout=subprocess.DEVNULL)


def netd(
    work: Path, port: int, admin: int, pin: bool, smarthost: int | None
) -> subprocess.Popen[bytes]:
    delivery = "{mode: capture}"
    if smarthost is not None:
        delivery = f"{{mode: smarthost, smarthost: '127.0.0.1:{smarthost}', tls: none}}"
    (work / "netd.yaml").write_text(
        f"state_dir: {work / 'state'}\n"
        f"admin: {{listen: ['tcp:{admin}:interface=127.0.0.1']}}\n"
        "services:\n"
        "  mail:\n"
        "    type: smtp\n"
        f"    listen: ['tcp:{port}:interface=127.0.0.1:backlog=1024']\n"
        "    hostname: bench.netd.test\n"
        f"    delivery: {delivery}\n"
    )
    command = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "netd", "-c", str(work / "netd.yaml")]
    log = (work / "netd.log").open("wb")
    return subprocess.Popen(pinned(1, pin) + command, stdout=log, stderr=log, cwd=work)


def run_client(
    port: int, duration: float, conns: int, size: int, limit: int, pin: bool
) -> dict[str, float]:
    command = [sys.executable, __file__, "--client", str(port), "--duration", str(duration)]
    command += ["--conns", str(conns), "--size", str(size), "--limit", str(limit)]
    done = subprocess.run(
        pinned(0, pin) + command, capture_output=True, text=True, check=True, timeout=duration + 60
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def client_main(port: int, duration: float, conns: int, size: int, limit: int) -> None:
    """The load: what peer-bench's smtp_client.py does, with a message limit."""
    line = "The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrst\r\n"
    # Whole lines: peer-bench's client cuts the body at SIZE, which for 10240
    # falls between a CR and its LF, and every message then has a bare CR that
    # netd repairs (RFC 5321 2.3.8; smtp_bare_newlines_normalised counts them)
    # and aiosmtpd never looks for.
    whole = size // len(line)
    body = line * whole + "x" * max(size - whole * len(line) - 2, 0) + "\r\n"
    message = (
        "From: bench@client.test\r\nTo: sink@netd.test\r\nSubject: bench\r\n\r\n" + body
    ).encode()
    tickets = itertools.count()
    sent = [0] * conns
    errors = [0] * conns
    barrier = threading.Barrier(conns + 1)
    deadline = [0.0]

    def worker(index: int) -> None:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.test")
        barrier.wait()
        while next(tickets) < limit and time.perf_counter() < deadline[0]:
            try:
                client.sendmail("bench@client.test", ["sink@netd.test"], message)
                sent[index] += 1
            except smtplib.SMTPException:
                errors[index] += 1
        client.quit()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + duration
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    print(json.dumps({"msgs_s": sum(sent) / elapsed, "sent": sum(sent), "errors": sum(errors)}))


def queue_length(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("netd_smtp_queue_messages{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def measure(name: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    port = free_port()
    if name == "aiosmtpd":
        process = aiosmtpd(port, args.pin)
    else:
        process = netd(work, port, free_port(), args.pin, None)
    try:
        wait_for(lambda: accepts(port), name)
        before = cpu_seconds(process.pid)
        result = run_client(port, args.duration, args.conns, args.size, 1_000_000, args.pin)
        result["cpu_ms_per_msg"] = (
            1000 * (cpu_seconds(process.pid) - before) / max(result["sent"], 1)
        )
        result["rss_mib"] = proc_mib(process.pid)
    finally:
        stop(process)
    return result


def measure_relay(args: argparse.Namespace, work: Path) -> dict[str, float]:
    sink_port, port, admin = free_port(), free_port(), free_port()
    sink = aiosmtpd(sink_port, args.pin)
    relay = netd(work, port, admin, args.pin, sink_port)
    try:
        wait_for(lambda: accepts(sink_port) and accepts(port), "relay")
        start = time.perf_counter()
        result = run_client(
            port, args.duration, args.conns, args.size, args.relay_messages, args.pin
        )
        sent_at = time.perf_counter()
        wait_for(lambda: queue_length(admin) == 0, "an empty queue", timeout=120)
        done_at = time.perf_counter()
        result["relay_msgs_s"] = result["sent"] / (done_at - start)
        result["drain_s"] = done_at - sent_at
        result["rss_mib"] = proc_mib(relay.pid)
    finally:
        stop(relay)
        stop(sink)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11))
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--relay-messages", type=int, default=2000)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=1_000_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, min(args.duration, 30), args.conns, args.size, args.limit)
        return
    args.duration = min(max(args.duration, 0.5), 30)
    rows: dict[str, list[dict[str, float]]] = {"netd": [], "aiosmtpd": [], "relay": []}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="smtp-bench-", dir=Path.cwd()) as base:
        for round in range(args.rounds):
            order = ["netd", "aiosmtpd"] if round % 2 == 0 else ["aiosmtpd", "netd"]
            found = {}
            for name in order:
                work = Path(base) / f"{name}-{round}"
                work.mkdir()
                found[name] = measure(name, args, work)
                rows[name].append(found[name])
                print(f"round {round + 1} {name}: {found[name]}", file=sys.stderr)
            ratios.append(found["netd"]["msgs_s"] / found["aiosmtpd"]["msgs_s"])
        # The relay deletes each message it delivers, so its rounds come after every
        # capture round: on ext4 without a journal (this VM's root) a file created
        # within a minute of thousands of deletions costs its creator up to 4.6x the
        # CPU (the allocator's recently_deleted check), which would land on netd alone.
        # For the same reason the work folders are all removed at the end.
        for round in range(args.rounds):
            work = Path(base) / f"relay-{round}"
            work.mkdir()
            rows["relay"].append(measure_relay(args, work))
            print(f"round {round + 1} relay: {rows['relay'][-1]}", file=sys.stderr)

    def median(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    print(f"smtp capture, {args.conns} connections, {args.size} B messages, {args.rounds} rounds")
    print("| server | msgs/s | server CPU ms/msg | peak RSS MiB |")
    print("|---|---|---|---|")
    for name in ("netd", "aiosmtpd"):
        print(
            f"| {name} | {median(name, 'msgs_s'):,.0f} | {median(name, 'cpu_ms_per_msg'):.2f} "
            f"| {median(name, 'rss_mib'):.1f} |"
        )
    print(
        f"netd / aiosmtpd: {statistics.median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f}), netd fsyncs every message"
    )
    print(
        f"relay netd -> aiosmtpd: {median('relay', 'relay_msgs_s'):,.0f} msgs/s end to end "
        f"({median('relay', 'msgs_s'):,.0f} msgs/s accepted), "
        f"netd peak RSS {median('relay', 'rss_mib'):.1f} MiB; "
        f"{median('relay', 'relay_msgs_s') / median('aiosmtpd', 'msgs_s'):.2f}x "
        "aiosmtpd's accept rate"
    )


if __name__ == "__main__":
    main()
