#!/usr/bin/env python3
"""Draw BENCHMARKS.md's plot from a sitting's JSON lines (scripts/bench-sitting).

    python3 scripts/bench-plot.py target/bench/sitting.jsonl docs/bench-plot.svg

Panels, each drawn when the input has its runs: p99 latency and server CPU per
delivery against connections (one room, 20 messages/s in) and against rate (1,000
connections, the ramp's steps) from scripts/bench-sitting; time for N clients to
join and server RSS per connection against N, one room and 100 rooms, from
scripts/bench-bigroom. Standard library only: the SVG is written by hand.
"""
import json
import math
import sys

COLORS = {"floor": "#555555", "hubbub": "#d62728", "hubbub-batch": "#1f77b4",
          "hubbub-memory": "#2ca02c"}
W, H = 460, 300
ML, MR, MT, MB = 64, 16, 34, 46


def series(rows, prefix):
    out = {}
    for r in rows:
        label = r.get("label", "")
        if not label.startswith(prefix):
            continue
        name = label[len(prefix):]
        res = r["result"]
        for step in res.get("steps", []):
            out.setdefault(name, []).append((res["conns"], step))
    return out


def nice_ticks(lo, hi, log):
    if log:
        ticks = []
        e = math.floor(math.log10(lo))
        while 10 ** e <= hi * 1.0001:
            for m in (1, 2, 5):
                v = m * 10 ** e
                if lo * 0.999 <= v <= hi * 1.001:
                    ticks.append(v)
            e += 1
        return ticks
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9)))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    v = math.floor(lo / step) * step
    ticks = []
    while v <= hi + 1e-9:
        ticks.append(v)
        v += step
    return ticks


def fmt(v):
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def panel(ox, oy, title, xlabel, ylabel, lines, xlog=True, ylog=True):
    pts = [p for _, ps in lines for p in ps if p[0] > 0 and p[1] > 0]
    if not pts:
        return ""
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if ylog:
        y0, y1 = 10 ** math.floor(math.log10(y0)), 10 ** math.ceil(math.log10(y1))
    else:
        y0, y1 = 0, y1 * 1.1
    if x0 == x1:
        x1 = x0 * 2

    def sx(x):
        f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if xlog else (x - x0) / (x1 - x0)
        return ox + ML + f * (W - ML - MR)

    def sy(y):
        f = (math.log(y) - math.log(y0)) / (math.log(y1) - math.log(y0)) if ylog else (y - y0) / (y1 - y0)
        return oy + H - MB - f * (H - MT - MB)

    s = [f'<text x="{ox + W / 2}" y="{oy + 20}" text-anchor="middle" font-weight="bold">{title}</text>',
         f'<rect x="{ox + ML}" y="{oy + MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="none" stroke="#999"/>']
    for t in nice_ticks(x0, x1, xlog):
        s.append(f'<line x1="{sx(t):.1f}" y1="{oy + H - MB}" x2="{sx(t):.1f}" y2="{oy + MT}" stroke="#eee"/>')
        s.append(f'<text x="{sx(t):.1f}" y="{oy + H - MB + 14}" text-anchor="middle" font-size="10">{fmt(t)}</text>')
    for t in nice_ticks(y0, y1, ylog):
        s.append(f'<line x1="{ox + ML}" y1="{sy(t):.1f}" x2="{ox + W - MR}" y2="{sy(t):.1f}" stroke="#eee"/>')
        s.append(f'<text x="{ox + ML - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10">{fmt(t)}</text>')
    s.append(f'<text x="{ox + W / 2}" y="{oy + H - 10}" text-anchor="middle" font-size="11">{xlabel}</text>')
    s.append(f'<text x="{ox + 14}" y="{oy + H / 2}" text-anchor="middle" font-size="11" '
             f'transform="rotate(-90 {ox + 14} {oy + H / 2})">{ylabel}</text>')
    ly = oy + MT + 12
    for name, ps in lines:
        ps = sorted(p for p in ps if p[0] > 0 and p[1] > 0)
        if not ps:
            continue
        c = COLORS.get(name.split(",")[0], "#9467bd")
        dash = ' stroke-dasharray="6 3"' if "100 rooms" in name else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        s.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for x, y in ps:
            s.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>')
        s.append(f'<text x="{ox + ML + 8}" y="{ly}" font-size="11" fill="{c}">{name}</text>')
        ly += 13
    return "\n".join(s)


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rows = [json.loads(l) for l in open(src) if l.strip()]
    by_conns = series(rows, "conns-")
    by_rate = series(rows, "ramp-")
    conns_p99 = [(n, [(c, st["p99_ms"]) for c, st in ps]) for n, ps in by_conns.items()]
    conns_cpu = [(n, [(c, st["server_cpu_us_per_delivery"] or 0) for c, st in ps]) for n, ps in by_conns.items()]
    rate_p99 = [(n, [(st["deliveries_per_sec"], st["p99_ms"]) for _, st in ps]) for n, ps in by_rate.items()]
    rate_cpu = [(n, [(st["deliveries_per_sec"], st["server_cpu_us_per_delivery"] or 0) for _, st in ps])
                for n, ps in by_rate.items()]
    joins = {}
    for r in rows:
        label = r.get("label", "")
        if label not in ("join-1-room", "join-100-rooms"):
            continue
        res = r["result"]
        name = f'{r["server"]}, {"1 room" if label == "join-1-room" else "100 rooms"}'
        secs = res.get("joined_seconds", res.get("open_seconds"))
        joins.setdefault(name, []).append((res["conns"], secs, res.get("rss_bytes_per_conn") or 0))
    join_time = [(n, [(c, t) for c, t, _ in ps]) for n, ps in sorted(joins.items())]
    join_rss = [(n, [(c, b) for c, _, b in ps]) for n, ps in sorted(joins.items())]
    wanted = [
        ("p99 latency vs connections (1 room, 20 msg/s in)", "connections", "p99 (ms)", conns_p99, True),
        ("server CPU per delivery vs connections", "connections", "µs per delivery", conns_cpu, True),
        ("p99 latency vs rate (1,000 connections, 1 room)", "deliveries/s", "p99 (ms)", rate_p99, True),
        ("server CPU per delivery vs rate", "deliveries/s", "µs per delivery", rate_cpu, True),
        ("time until N clients have joined", "clients", "seconds", join_time, True),
        ("idle server RSS per connection", "clients", "bytes per connection", join_rss, False),
    ]
    body = []
    for title, xl, yl, lines, ylog in wanted:
        if not any(ps for _, ps in lines):
            continue
        i = len(body)
        body.append(panel((i % 2) * W, (i // 2) * H, title, xl, yl, lines, ylog=ylog))
    rows_drawn = (len(body) + 1) // 2
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{rows_drawn * H}" '
           f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(body) + "\n</svg>\n")
    with open(dst, "w") as f:
        f.write(svg)


if __name__ == "__main__":
    main()
