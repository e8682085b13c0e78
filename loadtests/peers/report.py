"""The peer benchmark's Markdown tables, target lines and plot (from loadtests/peers/__main__.py's results)."""

from __future__ import annotations

from pathlib import Path

TARGETS = {"act": ("ahead of every peer", 1.0, "every"),
           "classify": ("within 5% of the best peer, or ahead", 0.95, "best")}


def timed(results: list[dict], endpoint: str) -> list[dict]:
    return [r for r in results if r["endpoint"] == endpoint and r.get("runs")]


def report(setup: dict, results: list[dict], endpoints: dict, peers: dict) -> str:
    ours = ", ".join(f"{k} {v}" for k, v in setup["ours"].items())
    lines = ["# Against peer servers", "",
             f"Command: `{setup['command']}`  ",
             f"Machine: {setup['machine']}; ours: {ours}  ",
             f"Cores: every server (ours and the peer, one onnxruntime thread each) on {setup['server_cores']}, "
             f"wrk and the latency client on {setup['client_cores']}.  ",
             f"Method: ours and one peer up together; wrk drives them in turn, {setup['slices']} slices of "
             f"{setup['slice_seconds']:g} s each per connection count (requests/s), the other server stopped (SIGSTOP) "
             "meanwhile so each has the core to itself; then this process's aiohttp client, "
             f"{setup['slices']} slices of {setup['latency_seconds']:g} s each (p50, p99; wrk's own percentiles are "
             "not trusted on these machines). Every answer was first checked equal to onnxruntime's in-process answer "
             "to the same inputs. ours / peer: requests/s of ours over the peer's, from the same alternating run.", ""]
    for name, endpoint in endpoints.items():
        rows = [r for r in results if r["endpoint"] == name]
        if not rows:
            continue
        lines += [f"## /{name}", "", f"{endpoint.description}.", "",
                  f"| peer | connections | peer req/s | ours req/s | peer {endpoint.unit}/s | ours {endpoint.unit}/s | "
                  "peer p50 / p99 ms | ours p50 / p99 ms | ours / peer | failed (peer, ours) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if not r.get("runs"):
                lines.append(f"| {r['peer']} | | not timed: {r.get('check', 'did not run')} | | | | | | | |")
                continue
            for run in r["runs"]:
                p, o = run["peer"], run["ours"]
                lines.append(f"| {r['peer']} | {run['connections']} | {p['requests_per_s']:,.0f} | "
                             f"{o['requests_per_s']:,.0f} | {p['items_per_s']:,.0f} | {o['items_per_s']:,.0f} | "
                             f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} | {o['p50_ms']:.2f} / {o['p99_ms']:.2f} | "
                             f"**{run['ours_over_peer']:.2f}** | {p['failures']}, {o['failures']} |")
        lines += [""] + target_lines(name, rows) + [""]
    lines += ["## The peers", "", "| peer | versions | configuration | answers |", "|---|---|---|---|"]
    seen = set()
    for r in results:
        if r["peer"] in seen:
            continue
        seen.add(r["peer"])
        checks = "; ".join(f"/{x['endpoint']}: {x.get('check', 'not run')}" for x in results if x["peer"] == r["peer"])
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        lines.append(f"| {r['peer']} | {versions} | {r['config']} | {checks} |")
    lines += ["", "Each peer runs loadtests/peers/<peer>_peer.py: the same model files (the newest version in "
              "models/, what ours serves by default), the same onnxruntime session options and the same decoding, "
              "preprocessing and answers as ours (loadtests/peers/work.py, from services/contracts). "
              "The peers' environment: loadtests/peers/requirements.txt (`make peers-venv`)."]
    return "\n".join(lines) + "\n"


def target_lines(endpoint: str, rows: list[dict]) -> list[str]:
    text, bound, kind = TARGETS[endpoint]
    timed_rows = [r for r in rows if r.get("runs")]
    if not timed_rows:
        return [f"- target ({text}): not measured, no peer was timed."]
    out = []
    for k, run in enumerate(timed_rows[0]["runs"]):
        ratios = {r["peer"]: r["runs"][k]["ours_over_peer"] for r in timed_rows}
        if kind == "every":
            worst = min(ratios, key=ratios.get)
            verdict = "met" if ratios[worst] > bound else "missed"
            out.append(f"- target at {run['connections']} connection(s), {text}: **{verdict}** "
                       f"(lowest ours / peer: {ratios[worst]:.2f}, {worst})")
        else:
            best = min(ratios, key=ratios.get)  # the fastest peer gives the lowest ratio
            verdict = "met" if ratios[best] >= bound else "missed"
            out.append(f"- target at {run['connections']} connection(s), {text}: **{verdict}** "
                       f"(ours / best peer {best}: {ratios[best]:.2f})")
    return out


def plot(results: list[dict], endpoints: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in endpoints if timed(results, n)]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = timed(results, name)
        width = 0.8 / (len(rows[0]["runs"]) * 2)
        for k, run in enumerate(rows[0]["runs"]):
            connections = run["connections"]
            xs = range(len(rows))
            ax.bar([x + (2 * k) * width for x in xs], [r["runs"][k]["peer"]["requests_per_s"] for r in rows], width,
                   label=f"peer, {connections} conn")
            ax.bar([x + (2 * k + 1) * width for x in xs], [r["runs"][k]["ours"]["requests_per_s"] for r in rows],
                   width, label=f"ours, {connections} conn", hatch="//")
        ax.set_xticks([x + width * (len(rows[0]["runs"]) - 0.5) for x in range(len(rows))])
        ax.set_xticklabels([r["peer"] for r in rows])
        ax.set_ylabel("requests/s")
        ax.set_title(f"/{name}: each peer and ours, same run")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
