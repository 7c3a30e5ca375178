"""
Interleaved A/B of two trees: is a change slower? Both trees' daemons run at once, each
with an HTTP model (the free nginx model, as in bench/run.py) and a jsonl model
(bench/echo_jsonl.py); wrk sends them the same requests, alternating between the two
every 3 s (the order swapped each round), and each daemon's own CPU time
(/proc/PID/stat utime+stime, models excluded) is counted per request. On a machine whose
speed drifts from one minute to the next, the ratio of neighbouring runs is steadier than
two `make bench` runs. Loopback only; needs nginx and wrk (as `make bench` installs), and
a venv with aibackend in each tree (`make .venv/.test-installed`).

Usage, from the project root:
    git worktree add --detach /tmp/before HEAD~5 && (cd /tmp/before && make .venv/.test-installed)
    .venv/bin/python bench/ab.py /tmp/before . 12
"""
import os, re, shutil, signal, socket, subprocess, sys, tempfile, time, statistics as st

base, main, rounds = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), int(sys.argv[3])
tmp = tempfile.mkdtemp(prefix="ab-")
TICK = os.sysconf("SC_CLK_TCK")

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

nginx_port = free_port()
conf = open(os.path.join(main, "bench/nginx-free.conf.in")).read()
conf = conf.replace("@USER@", "user root;" if os.getuid() == 0 else "").replace("@TMP@", tmp).replace("@PORT@", str(nginx_port))
open(f"{tmp}/nginx.conf", "w").write(conf)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
nginx = subprocess.Popen([NGINX, "-p", tmp, "-c", f"{tmp}/nginx.conf", "-g", f"daemon off; pid {tmp}/nginx.pid;"])

def daemon(tree, name):
    cfg = f"""[server]
access_log = false
listen = ["tcp:0:interface=127.0.0.1"]

[[models]]
id = "free"
type = "http"
url = "http://127.0.0.1:{nginx_port}/"

[[models]]
id = "echo"
type = "subprocess"
command = ["{sys.executable}", "{tree}/bench/echo_jsonl.py"]
protocol = "jsonl"
workers = 1
max_inflight = 64
"""
    path = f"{tmp}/{name}.toml"; open(path, "w").write(cfg)
    log = open(f"{tmp}/{name}.log", "w+")
    p = subprocess.Popen([f"{tree}/.venv/bin/twistd", "--pidfile=", "-n", "aibackend", "--config", path,
                          "--state", f"{tmp}/{name}-state"], stdout=log, stderr=subprocess.STDOUT, cwd=tree)
    for _ in range(200):
        time.sleep(0.1)
        text = open(f"{tmp}/{name}.log").read()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
        if m:
            port = int(m.group(1))
            break
    else:
        raise SystemExit(f"the daemon of {tree} did not start; see {tmp}/{name}.log")
    time.sleep(2)
    return p, port

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK

def run(pid, port, model, conns, seconds=3):
    before = cpu(pid)
    out = subprocess.run(["wrk", "-t1" if conns == 1 else "-t2", f"-c{conns}", f"-d{seconds}s", "-s",
                          f"{main}/bench/post.lua", f"http://127.0.0.1:{port}/post/predict?id={model}"],
                         capture_output=True, text=True).stdout
    used = cpu(pid) - before
    n = int(re.search(r"(\d+) requests in", out).group(1))
    return used / n * 1e6

daemons = {"base": daemon(base, "base"), "main": daemon(main, "main")}
results = {}
try:
    for model in ("free", "echo"):
        for conns in (1, 32):
            for tree in ("base", "main"):  # warm-up
                p, port = daemons[tree]; run(p.pid, port, model, conns, 1)
            for r in range(rounds):
                order = ("base", "main") if r % 2 == 0 else ("main", "base")
                for tree in order:
                    p, port = daemons[tree]
                    results.setdefault((model, conns, tree), []).append(run(p.pid, port, model, conns))
finally:
    for p, _ in daemons.values():
        p.send_signal(signal.SIGTERM); p.wait(20)
    nginx.send_signal(signal.SIGQUIT); nginx.wait(10)

for model in ("free", "echo"):
    for conns in (1, 32):
        b, m = results[(model, conns, "base")], results[(model, conns, "main")]
        ratios = [y / x for x, y in zip(b, m)]
        print(f"{'aibackend-http' if model=='free' else 'aibackend-jsonl':16} c{conns:<3} base median {st.median(b):6.1f} µs "
              f"main median {st.median(m):6.1f} µs  main/base per pair: median {st.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); base spread {min(b):.0f}-{max(b):.0f}, main {min(m):.0f}-{max(m):.0f}")
