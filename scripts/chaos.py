#!/usr/bin/env python3
"""`run` under load while faults land at random moments; every round ends in a drain.

Each round starts a supervisor (as a subreaper, on loopback ports) with nginx, two soak loads
(keep-alive and one connection per request) and a liveness/readiness prober, injects a few faults
at random moments while nginx serves, then ends the round the way the kubelet does: SIGTERM, or
the preStop `drain` hook and then SIGTERM. The load stops inside the propagation delay, as it does
once the endpoint removal has propagated. A round passes when no request failed, no probe went
unanswered while the supervisor could run, the supervisor exited 0 within the grace period (a
master killed on purpose must be reported, with its status, 137), and no nginx process, zombie, drain flag
or control socket is left.

    scripts/chaos.sh [--minutes N] [--seed S]

Only loopback addresses; every wait and loop is bounded; only processes this script started are
signalled, by pid.
"""

import argparse
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

DELAY_S = 2.0
GRACE_S = 20.0
SLOW_RATE = 65536  # bytes/s: the slow path takes one second

FAULTS = [
    "reload",  # a config change the watch turns into a reload
    "bad-config",  # a config nginx -t refuses, then put right
    "sighup",  # a reload by signal
    "health-flood",  # hundreds of idle and half-sent requests held on the probe port
    "control-flood",  # connections held on the control socket, one sending megabytes unbroken
    "sigstop",  # the supervisor stopped for 1.5 s
    "stderr-stall",  # nobody reads the supervisor's log for 3 s (a 4 KiB pipe)
    "stderr-close",  # the log's reader goes away for good
]
# How a round ends, besides the SIGTERM every round gets.
ENDINGS = ["sigterm", "prestop-hook", "second-sigterm", "master-killed-in-delay"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid):
    """(ppid, state, starttime) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read(4096).decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root):
    """Every process below `root`, as {pid: (state, starttime)}."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st:
                stats[int(entry)] = st
    below, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, start) in stats.items():
            if ppid == parent and pid not in below:
                below[pid] = (state, start)
                frontier.append(pid)
    return below


def children(parent):
    return [pid for pid in descendants(parent) if (proc_stat(pid) or (0,))[0] == parent]


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Site:
    """nginx's config: conf.d watched, its access log written into the watched directory."""

    def __init__(self, root):
        self.root = root
        self.port = free_port()
        self.health_port = free_port()
        self.runtime = os.path.join(root, "runtime")
        self.confd = os.path.join(root, "conf.d")
        os.makedirs(os.path.join(root, "www/slow"))
        os.makedirs(self.confd)
        with open(os.path.join(root, "www/slow/1s.bin"), "wb") as f:
            f.write(b"x" * SLOW_RATE)
        snippet = open(os.path.join(REPO, "nginx-conf/graceful-drain.conf")).read()
        snippet = snippet.replace("/run/nginx-graceful/draining", f"{self.runtime}/draining")
        with open(os.path.join(root, "graceful-drain.conf"), "w") as f:
            f.write(snippet)
        with open(os.path.join(self.confd, "extra.conf"), "w") as f:
            f.write("# reloads append to this file\n")
        r = root
        self.config = os.path.join(root, "nginx.conf")
        with open(self.config, "w") as f:
            f.write(f"""worker_processes 2;
pid {r}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 1024; }}
http {{
    access_log {self.confd}/access.log;
    default_type text/plain;
    keepalive_timeout 60s;
    client_body_temp_path {r}/cb; proxy_temp_path {r}/proxy; fastcgi_temp_path {r}/fcgi;
    uwsgi_temp_path {r}/uwsgi; scgi_temp_path {r}/scgi;
    include {self.confd}/*.conf;
    server {{
        listen 127.0.0.1:{self.port};
        include {r}/graceful-drain.conf;
        root {r}/www;
        location = / {{ return 200 "ok\\n"; }}
        location /slow/ {{ limit_rate {SLOW_RATE}; }}
    }}
}}
""")

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"


class Log:
    """Reads the supervisor's stderr (a 4 KiB pipe) into a file; can stall or stop reading."""

    def __init__(self, pipe, path):
        self.pipe = pipe
        self.out = open(path, "wb")
        self.readable = threading.Event()
        self.readable.set()
        self.closed = False
        try:
            fcntl.fcntl(pipe.fileno(), 1031, 4096)  # F_SETPIPE_SZ: a stall fills it quickly
        except OSError:
            pass
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.closed:
            if not self.readable.wait(timeout=0.5):
                continue
            try:
                chunk = os.read(self.pipe.fileno(), 65536)
            except OSError:
                return
            if not chunk:
                return
            self.out.write(chunk)
            self.out.flush()

    def stall(self, seconds):
        self.readable.clear()
        time.sleep(seconds)
        self.readable.set()

    def close(self):
        self.closed = True
        self.readable.set()
        self.thread.join(timeout=2)
        self.pipe.close()

    def text(self):
        self.out.flush()
        with open(self.out.name, "rb") as f:
            return f.read().decode(errors="replace")


class Prober:
    """GET /healthz and /readyz every 0.5 s with a 1 s timeout, as a kubelet would."""

    def __init__(self, site):
        self.site = site
        self.stop = threading.Event()
        self.paused = threading.Event()  # the supervisor is stopped on purpose
        self.draining = threading.Event()
        self.probes = 0
        self.failures = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.5):
            for path in ("/healthz", "/readyz"):
                if self.paused.is_set():
                    continue
                started = time.monotonic()
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.site.health_port}{path}", timeout=1
                    ) as r:
                        status = r.status
                except urllib.error.HTTPError as e:
                    status = e.code
                except OSError as e:
                    status = f"{type(e).__name__}: {e}"
                if self.paused.is_set():
                    continue  # the stop began while the probe waited
                self.probes += 1
                # Once the drain starts, readiness fails on purpose, liveness no longer matters
                # (the pod is going) and the listener closes as the supervisor exits: only a
                # probe left unanswered (a starved listener) counts.
                refused = isinstance(status, str) and "Connection refused" in status
                if self.draining.is_set() and (isinstance(status, int) or refused):
                    continue
                if status != 200:
                    took = time.monotonic() - started
                    self.failures.append(f"{path} (answered in {took:.1f}s): {status}")


def soak(tools, site, seconds, keepalive, out):
    # Slow downloads only on new connections: a keep-alive response that started before a
    # reload's close window and ends after it loses the next request (docs/reloads.md).
    mode, mix = ("--keepalive", "/=100") if keepalive else ("--no-keepalive", "/=97,/slow/1s.bin=3")
    args = [tools, "soak", "--url", site.url(), mode, "--concurrency", "6", "--rate", "300",
            "--duration", f"{seconds:.2f}s", "--path-mix", mix, "--json"]
    return subprocess.Popen(args, stdout=open(out, "wb"), stderr=subprocess.DEVNULL)


def hold_health_connections(site, count, until):
    held = []
    for i in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", site.health_port), timeout=1)
            if i % 2:
                s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(s)
        except OSError:
            break
    until.wait(timeout=GRACE_S * 2)
    for s in held:
        s.close()
    return len(held)


def hold_control_connections(site, count, until):
    path = os.path.join(site.runtime, "control.sock")
    held = []
    for _ in range(count):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(path)
            held.append(s)
        except OSError:
            break
    if held:
        try:
            chunk = b"x" * 65536
            for _ in range(128):  # 8 MiB without a newline, or until the supervisor hangs up
                held[0].send(chunk)
        except OSError:
            pass
    until.wait(timeout=GRACE_S * 2)
    for s in held:
        s.close()
    return len(held)


def inject(fault, site, supervisor, log, prober, round_over):
    if fault == "reload":
        with open(os.path.join(site.confd, "extra.conf"), "a") as f:
            f.write(f"# changed at {time.time()}\n")
    elif fault == "bad-config":
        broken = os.path.join(site.confd, "broken.conf")
        with open(broken, "w") as f:
            f.write("this is not nginx;\n")
        time.sleep(1.0)
        os.unlink(broken)
    elif fault == "sighup":
        supervisor.send_signal(signal.SIGHUP)
    elif fault == "health-flood":
        threading.Thread(target=hold_health_connections, args=(site, 400, round_over), daemon=True).start()
    elif fault == "control-flood":
        threading.Thread(target=hold_control_connections, args=(site, 300, round_over), daemon=True).start()
    elif fault == "sigstop":
        prober.paused.set()
        supervisor.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        supervisor.send_signal(signal.SIGCONT)
        time.sleep(0.2)
        prober.paused.clear()
    elif fault == "stderr-stall":
        log.stall(3.0)
    elif fault == "stderr-close":
        log.close()


def wait_serving(site, supervisor, bound_s=10):
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline and supervisor.poll() is None:
        try:
            with urllib.request.urlopen(site.url(), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def run_round(n, rng, args, workdir):
    root = tempfile.mkdtemp(prefix=f"round{n}-", dir=workdir)
    os.chmod(root, 0o755)  # nginx's workers run as another user and stat the drain flag
    site = Site(root)
    faults = rng.sample(args.faults, k=rng.randint(1, min(3, len(args.faults))))
    ending = rng.choice(args.endings)
    serve_s = rng.uniform(4.0, 8.0)
    argv = [args.supervisor, "--log-format", "json", "run",
            "--health-listen", f"127.0.0.1:{site.health_port}", "--runtime-dir", site.runtime,
            "--propagation-delay", f"{DELAY_S}s", "--grace-period", f"{GRACE_S}s",
            "--watch", site.confd, "--", "nginx", "-c", site.config, "-g", "daemon off;"]
    supervisor = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
    log = Log(supervisor.stderr, os.path.join(root, "supervisor.log"))
    result = {"round": n, "faults": faults, "ending": ending, "problems": []}
    problems = result["problems"]
    round_over = threading.Event()
    seen = {}
    try:
        if not wait_serving(site, supervisor):
            problems.append("nginx did not serve within 10 s")
            return result
        prober = Prober(site)
        load_s = serve_s + DELAY_S - 0.5  # the load ends inside the delay
        loads = [soak(args.tools, site, load_s, ka, os.path.join(root, f"soak-{ka}.json"))
                 for ka in (True, False)]
        started = time.monotonic()
        at = sorted(rng.uniform(0.3, serve_s - 0.3) for _ in faults)
        for when, fault in zip(at, faults):
            time.sleep(max(0.0, started + when - time.monotonic()))
            seen.update(descendants(supervisor.pid))
            inject(fault, site, supervisor, log, prober, round_over)
        time.sleep(max(0.0, started + serve_s - time.monotonic()))
        seen.update(descendants(supervisor.pid))
        zombies = [p for p, (s, _) in descendants(supervisor.pid).items() if s == "Z"]
        hwm = vm_hwm_kib(supervisor.pid)

        prober.draining.set()
        hook = None
        if ending == "prestop-hook":
            hook = subprocess.Popen([args.supervisor, "drain", "--runtime-dir", site.runtime,
                                     "--grace-period", f"{GRACE_S}s"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            supervisor.send_signal(signal.SIGTERM)
        if ending in ("second-sigterm", "master-killed-in-delay"):
            time.sleep(0.5)
            if ending == "second-sigterm":
                supervisor.send_signal(signal.SIGTERM)
            else:
                for pid in children(supervisor.pid):  # nginx's master
                    os.kill(pid, signal.SIGKILL)
        if hook:
            try:
                _, hook_err = hook.communicate(timeout=GRACE_S + 5)
                if hook.returncode != 0:
                    problems.append(f"drain hook exited {hook.returncode}: {hook_err.decode()[-300:]}")
            except subprocess.TimeoutExpired:
                hook.kill()
                hook.wait()
                problems.append("the drain hook did not return within the grace period")
            supervisor.send_signal(signal.SIGTERM)  # the kubelet's, after the hook
        deadline = time.monotonic() + GRACE_S + 5
        while supervisor.poll() is None and time.monotonic() < deadline:
            hwm = max(hwm or 0, vm_hwm_kib(supervisor.pid) or 0)
            time.sleep(0.1)
        if supervisor.poll() is None:
            problems.append("the supervisor did not exit within the grace period")
            supervisor.kill()
            supervisor.wait()
        prober.stop.set()
        prober.thread.join(timeout=3)
        for load in loads:
            try:
                load.wait(timeout=15)
            except subprocess.TimeoutExpired:
                load.kill()
                load.wait()

        result["hwm_kib"] = hwm
        result["exit"] = supervisor.returncode
        # A master killed on purpose is reported with its status: 128 + SIGKILL.
        wanted = 137 if ending == "master-killed-in-delay" else 0
        if supervisor.returncode != wanted:
            problems.append(f"exit {supervisor.returncode}, wanted {wanted}")
        result["requests"] = result["failed"] = 0
        for ka in (True, False):
            try:
                report = json.load(open(os.path.join(root, f"soak-{ka}.json")))
            except (OSError, ValueError):
                problems.append("a soak load wrote no report")
                continue
            result["requests"] += report["requests"]
            result["failed"] += report["failed"]
            if report["failed"]:
                # Times from the start of the drain (the load started with the round's clock).
                when = [f"{b['at_ms'] / 1000 - serve_s:+.1f}s {b['failures']}"
                        for b in report["failures_per_100ms"] if b["failed"]]
                mode = "keep-alive" if ka else "new connections"
                problems.append(f"{report['failed']} failed requests ({mode}): {', '.join(when)}")
        result["probes"] = prober.probes
        if prober.failures:
            problems.append(f"{len(prober.failures)} probes failed: {prober.failures[:3]}")
        if zombies:
            still = [p for p in zombies if (proc_stat(p) or (0, ""))[1] == "Z"]
            if still:
                problems.append(f"zombies under the supervisor: {still}")
        time.sleep(0.5)
        left = [p for p, (_, start) in seen.items() if (proc_stat(p) or (0, "", -1))[2] == start]
        if left:
            problems.append(f"processes left behind: {left}")
        for name in ("draining", "control.sock"):
            if os.path.lexists(os.path.join(site.runtime, name)):
                problems.append(f"{name} left in the runtime directory")
        return result
    finally:
        round_over.set()
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for pid, (_, start) in seen.items():
            if (proc_stat(pid) or (0, "", -1))[2] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not log.closed:
            log.close()
        if result["problems"]:
            tail = log.text()[-2000:]
            result["log_tail"] = tail
        else:
            shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--supervisor", required=True)
    parser.add_argument("--tools", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--faults", type=lambda v: v.split(","), default=FAULTS,
                        help=f"a comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--endings", type=lambda v: v.split(","), default=ENDINGS,
                        help=f"a comma-separated subset of {','.join(ENDINGS)}")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    print(f"chaos: seed {seed}, {args.minutes} minutes, rounds in {workdir}", file=sys.stderr)
    end = time.monotonic() + args.minutes * 60
    rounds = []
    while time.monotonic() < end:
        r = run_round(len(rounds) + 1, rng, args, workdir)
        rounds.append(r)
        verdict = "ok" if not r["problems"] else "FAILED: " + "; ".join(r["problems"])
        print(f"round {r['round']}: faults {','.join(r['faults'])}, end {r['ending']}, "
              f"{r.get('requests', 0)} requests, {r.get('failed', 0)} failed, "
              f"exit {r.get('exit')}, VmHWM {r.get('hwm_kib')} KiB: {verdict}", file=sys.stderr)
        if r["problems"] and r.get("log_tail"):
            print("  supervisor log, last lines:\n    "
                  + "\n    ".join(r["log_tail"].splitlines()[-12:]), file=sys.stderr)
        if "requests" not in r:
            print("chaos: stopped: nginx did not start, a problem of the setup", file=sys.stderr)
            break
    counts = {}
    for r in rounds:
        for fault in r["faults"] + [r["ending"]]:
            counts[fault] = counts.get(fault, 0) + 1
    summary = {
        "seed": seed,
        "rounds": len(rounds),
        "rounds_failed": sum(1 for r in rounds if r["problems"]),
        "faults_injected": sum(len(r["faults"]) for r in rounds),
        "by_fault": counts,
        "requests": sum(r.get("requests", 0) for r in rounds),
        "failed_requests": sum(r.get("failed", 0) for r in rounds),
        "probes": sum(r.get("probes", 0) for r in rounds),
        "supervisor_vm_hwm_kib_max": max((r.get("hwm_kib") or 0 for r in rounds), default=0),
    }
    print(json.dumps(summary, indent=2))
    if not any(r["problems"] for r in rounds):
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if summary["rounds_failed"] else 0


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    sys.exit(main())
