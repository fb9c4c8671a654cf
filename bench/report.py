"""Summary, targets, markdown table and plot of a benchmark run (``bench.run``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.workloads import Workload

# The issue's targets.
E2E_FACTOR = 1.1  # large and xl: lossd p50 <= 1.1 x (transport floor + compute floor)
SMALL_FACTOR = 1.3  # small: lossd p50 <= 1.3 x transport floor
TPUT_FACTOR = 0.8  # at 8 clients: lossd calls/s >= 0.8 x the floor's
RSS_PAYLOADS = 3  # xl: server peak RSS <= idle RSS + 3 x payload
MAX_CLIENT_COPIES = 1


def _best(cases: dict[str, dict[str, Any]], clients: int, prefix: str
          ) -> dict[str, Any] | None:
    """The better of the cases named ``prefix*`` (the transport floors, or the Triton peer's
    1 and 2 instances): lower p50 at one client, more calls/s with several."""
    found = [c for k, c in cases.items() if k.startswith(prefix)]
    if not found:
        return None
    if clients == 1:
        return min(found, key=lambda c: c["p50_ms"])
    return max(found, key=lambda c: c["calls_per_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def summarise(workloads: list[Workload], cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, concurrency): floor, compute, lossd, the Triton peer where
    measured, and their ratios."""
    rows = []
    for w in workloads:
        for clients in sorted({c["concurrency"] for c in cases if c["workload"] == w.name}):
            by_kind = {c["kind"]: c for c in cases
                       if c["workload"] == w.name and c["concurrency"] == clients}
            floor = _best(by_kind, clients, "floor_")
            compute = by_kind.get("compute")
            lossd = by_kind.get("lossd")
            row: dict[str, Any] = {"workload": w.name, "concurrency": clients,
                                   "floor_variant": floor["kind"] if floor else None}
            for name, c in (("floor", floor), ("compute", compute), ("lossd", lossd)):
                for key in ("p50_ms", "p99_ms", "calls_per_s", "samples_per_s", "mb_per_s"):
                    row[f"{name}_{key}"] = c[key] if c else None
            f50, c50, l50 = row["floor_p50_ms"], row["compute_p50_ms"], row["lossd_p50_ms"]
            fc, cc, lc = row["floor_calls_per_s"], row["compute_calls_per_s"], \
                row["lossd_calls_per_s"]
            row["floor_plus_compute_p50_ms"] = round(f50 + c50, 3) if f50 and c50 else None
            # Transport and compute share the same cores, so their costs per call add up.
            row["combined_calls_per_s"] = round(1 / (1 / fc + 1 / cc), 2) if fc and cc else None
            row["lossd_over_floor_p50"] = _ratio(l50, f50)
            row["lossd_over_floor_plus_compute_p50"] = _ratio(l50, row["floor_plus_compute_p50_ms"])
            row["lossd_over_floor_calls"] = _ratio(lc, fc)
            row["lossd_over_combined_calls"] = _ratio(lc, row["combined_calls_per_s"])
            triton = _best(by_kind, clients, "triton-")
            if triton:
                row["triton_variant"] = triton["kind"]
                row["triton_p50_ms"] = triton["p50_ms"]
                row["triton_calls_per_s"] = triton["calls_per_s"]
                # > 1: lossd is that many times faster than Triton's better configuration.
                row["triton_over_lossd_p50"] = _ratio(triton["p50_ms"], l50)
                row["lossd_over_triton_calls"] = _ratio(lc, triton["calls_per_s"])
            rows.append(row)
    return rows


def _row(summary: list[dict[str, Any]], workload: str, clients: int) -> dict[str, Any] | None:
    return next((r for r in summary if r["workload"] == workload
                 and r["concurrency"] == clients), None)


def _case(cases: list[dict[str, Any]], workload: str, clients: int, kind: str
          ) -> dict[str, Any] | None:
    return next((c for c in cases if c["workload"] == workload and c["concurrency"] == clients
                 and c["kind"] == kind), None)


def _stage_note(result: dict[str, Any], workload: str, clients: int) -> str:
    """Which stage costs what, for a missed target (lossd's own stage timers first)."""
    row = _row(result["summary"], workload, clients) or {}
    cases = result["cases"]
    lossd = _case(cases, workload, clients, "lossd")
    one = _case(cases, workload, clients, "lossd_1copy")
    fk = row.get("floor_variant")
    floor = _case(cases, workload, clients, fk) if fk else None
    if not lossd or not floor:
        return ""
    parts = [f"lossd mean {lossd['mean_ms']:.1f} ms vs transport floor mean "
             f"{floor['mean_ms']:.1f} ms"]
    if row.get("compute_p50_ms") is not None:
        parts[0] += f" + compute floor p50 {row['compute_p50_ms']:.1f} ms"
    st = lossd.get("server_stages_ms")
    if st:
        inner = ", ".join(f"{k} {st[k]:.1f}" for k in ("decode", "queue", "compute", "encode")
                          if k in st)
        parts.append(f"server handler {st.get('request', 0):.1f} ms/call by lossd's stage "
                     f"timers: {inner}, outside the stages {st.get('handler_other', 0):.1f} "
                     "(metrics, bookkeeping)")
        parts.append(f"outside the handler (client library, grpcio both sides, transport) "
                     f"{st.get('outside_handler', 0):.1f} ms")
    if one and clients == 1:
        parts.append(f"the same server with the floor's one-copy client: mean "
                     f"{one['mean_ms']:.1f} ms, so LossClient costs "
                     f"{lossd['mean_ms'] - one['mean_ms']:+.1f} ms/call")
    elif one:
        parts.append(f"the same server with the floor's one-copy client: "
                     f"{one['calls_per_s']:.1f} calls/s (LossClient: "
                     f"{lossd['calls_per_s']:.1f}, floor: {floor['calls_per_s']:.1f})")
    parts.append(f"CPU per call: lossd server {lossd['server_cpu_ms_per_call']:.1f} + clients "
                 f"{lossd['client_cpu_ms_per_call']:.1f} ms vs floor server "
                 f"{floor['server_cpu_ms_per_call']:.1f} + clients "
                 f"{floor['client_cpu_ms_per_call']:.1f} ms; server page faults "
                 f"{lossd['server_page_faults_per_call']:.0f} vs "
                 f"{floor['server_page_faults_per_call']:.0f} per call")
    return "; ".join(parts)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    summary, out = result["summary"], []
    for name in ("large", "xl"):
        r = _row(summary, name, 1)
        if r and r["lossd_over_floor_plus_compute_p50"] is not None:
            v = r["lossd_over_floor_plus_compute_p50"]
            out.append({"target": f"{name}: lossd p50 <= {E2E_FACTOR} x (transport + compute "
                                  "floor), 1 client",
                        "value": v, "limit": E2E_FACTOR, "met": v <= E2E_FACTOR,
                        "workload": name, "concurrency": 1})
    r = _row(summary, "small", 1)
    if r and r["lossd_over_floor_p50"] is not None:
        v = r["lossd_over_floor_p50"]
        out.append({"target": f"small: lossd p50 <= {SMALL_FACTOR} x transport floor, 1 client",
                    "value": v, "limit": SMALL_FACTOR, "met": v <= SMALL_FACTOR,
                    "workload": "small", "concurrency": 1})
    for r in summary:
        if r["concurrency"] > 1 and r["lossd_over_combined_calls"] is not None:
            v = r["lossd_over_combined_calls"]
            out.append({"target": f"{r['workload']}: calls/s at {r['concurrency']} clients >= "
                                  f"{TPUT_FACTOR} x floor's (transport and compute combined)",
                        "value": v, "limit": TPUT_FACTOR, "met": v >= TPUT_FACTOR,
                        "workload": r["workload"], "concurrency": r["concurrency"],
                        "vs_transport_floor_only": r["lossd_over_floor_calls"]})
    rss = result["rss"].get("xl")
    if rss and "c1" in rss:
        payload = next(w["payload_bytes"] for w in result["workloads"] if w["name"] == "xl")
        growth = rss["c1"]["peak"] - rss["idle_fresh"]
        v = round(growth / payload, 2)
        out.append({"target": f"xl: server peak RSS <= idle + {RSS_PAYLOADS} x payload "
                              "(1 client)", "value": v, "limit": RSS_PAYLOADS,
                    "met": v <= RSS_PAYLOADS, "workload": "xl", "concurrency": 1,
                    "idle_bytes": rss["idle_fresh"], "peak_bytes": rss["c1"]["peak"],
                    "payload_bytes": payload})
    for c in result.get("client_copies", []):
        if "build" not in c:
            continue
        v = round(c["build"]["faults"])
        out.append({"target": f"client: {c['kind']} -> request makes <= {MAX_CLIENT_COPIES} "
                              "copy of the payload", "value": v, "limit": MAX_CLIENT_COPIES,
                    "met": v <= MAX_CLIENT_COPIES, "alive_at_peak": c["build"].get("hwm"),
                    "serialize_copies": round(c["serialize"]["faults"])})
    for t in out:
        if not t["met"] and "workload" in t:
            t["note"] = _stage_note(result, t["workload"], t["concurrency"])
            if t["target"].startswith("xl: server peak RSS"):
                fl = [c for c in result["cases"] if c["workload"] == "xl"
                      and c["concurrency"] == 1 and c["kind"].startswith("floor_")]
                payload = t["payload_bytes"]
                floor = ", ".join(f"{c['kind']} {(c['server_rss']['peak'] - c['server_rss']['before']) / payload:.2f}"  # noqa: E501
                                  for c in fl)
                t["note"] = (f"idle {t['idle_bytes'] / 2**20:.0f} MiB, peak "
                             f"{t['peak_bytes'] / 2**20:.0f} MiB. The transport floor's peak "
                             "over its RSS before the case, in payloads: "
                             f"{floor} (grpcio's received slices and the joined bytes handed "
                             "to the deserializer). The rest is the server's: its parse and "
                             "decode buffers and the loss's intermediates (log_softmax output: "
                             "one payload in float32); RSS per stage is not measured")
        elif not t["met"]:
            t["note"] = (f"building the request touched {t['value']} payloads of new memory "
                         f"({t['alive_at_peak']} alive at once) and serialising it "
                         f"{t['serialize_copies']} more, in a fresh process; the floor's "
                         "encoder (bytes.join of the arrays' buffers) touches 1. Typical "
                         "sources: tobytes(), pb.Tensor(data=...), CopyFrom, and "
                         "SerializeToString's arena buffer plus its bytes object")
    return out


def assemble(*, machine: dict[str, Any], started: str, elapsed_s: float, config: dict[str, Any],
             workloads: list[Workload], cases: list[dict[str, Any]], servers: dict[str, Any],
             rss: dict[str, Any], stages: dict[str, Any], copies: list[dict[str, Any]]
             ) -> dict[str, Any]:
    result: dict[str, Any] = {
        "schema": 1, "machine": machine, "started": started, "elapsed_s": elapsed_s,
        "config": config, "workloads": [w.describe() for w in workloads], "cases": cases,
        "floor_servers": servers, "rss": rss, "stages": stages, "client_copies": copies}
    result["summary"] = summarise(workloads, cases)
    result["targets"] = targets(result)
    return result


# ---- markdown -------------------------------------------------------------------------

def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float | int):
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _git_line(result: dict[str, Any]) -> str:
    g = result["config"].get("git")
    if not g:
        return ""
    dirty = (f" plus uncommitted changes to {', '.join(g['uncommitted'])}"
             if g["uncommitted"] else "")
    return f"Code measured: commit `{g['commit'][:12]}`{dirty}.\n"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# lossd benchmark: {m['name']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; device `{m['device']}`; "
             f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
             f"grpcio {m['grpcio']}, protobuf {m['protobuf']}. Run {result['started']}, "
             f"{result['elapsed_s']:.0f} s"
             + (" (**--quick**: smoke run, numbers meaningless)" if result["config"]["quick"]
                else "") + ".", "",
             _git_line(result),
             "Clients: one process per client, each with its own channel; latencies pooled "
             "over clients; calls/s = calls / wall time of the measuring window. "
             "Transport floor = the better of the sync and asyncio floor servers (lower p50 at "
             "1 client, more calls/s at 8). Combined floor calls/s = 1 / (1/transport + "
             "1/compute) (they share the cores).", ""]

    lines += ["## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {_f(t['value'])} | {_f(t['limit'])} | {_f(t['met'])} |")
    notes = [t for t in result["targets"] if t.get("note")]
    if notes:
        lines += ["", "Where a target is missed:", ""]
        for t in notes:
            lines.append(f"- **{t['target']}** ({_f(t['value'])}): {t['note']}")

    lines += ["", "## Latency and throughput", "",
              "| workload | clients | measured | p50 ms | p99 ms | calls/s | samples/s | MB/s "
              "| calls |", "|---|---|---|---|---|---|---|---|---|"]
    labels = {"floor_sync": "transport floor (sync)", "floor_async": "transport floor (asyncio)",
              "compute": "compute floor", "lossd": "**lossd**",
              "lossd_1copy": "lossd server, one-copy client",
              "triton-1": "Triton, 1 instance", "triton-2": "Triton, 2 instances"}
    for r in result["summary"]:
        for kind in labels:
            c = _case(result["cases"], r["workload"], r["concurrency"], kind)
            if not c:
                continue
            label = labels[kind] + (" ★" if kind in (r["floor_variant"],
                                                     r.get("triton_variant")) else "")
            lines.append(f"| {r['workload']} | {r['concurrency']} | {label} | {_f(c['p50_ms'])} "
                         f"| {_f(c['p99_ms'])} | {_f(c['calls_per_s'])} | "
                         f"{_f(c['samples_per_s'])} | {_f(c['mb_per_s'])} | {c['calls']} |")
    lines += ["", "★ the transport floor and the Triton configuration used for the ratios. "
              "\"lossd server, one-copy client\": the floor's client (request bytes built with "
              "one copy) against lossd's server, to separate the client library's cost from "
              "the server's. Triton: tritonserver 2.51, python backend, the same torch "
              "cross_entropy, KIND_CPU instances, through `tritonclient.grpc` (`bench.triton`)."
              "", "",
              "## Ratios (lossd / floor)", "",
              "| workload | clients | lossd p50 / transport p50 | lossd p50 / (transport + "
              "compute) p50 | lossd calls/s / transport | lossd calls/s / combined floor |",
              "|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['workload']} | {r['concurrency']} | {_f(r['lossd_over_floor_p50'])} "
                     f"| {_f(r['lossd_over_floor_plus_compute_p50'])} | "
                     f"{_f(r['lossd_over_floor_calls'])} | "
                     f"{_f(r['lossd_over_combined_calls'])} |")
    peers = [r for r in result["summary"] if r.get("triton_variant")]
    if peers:
        lines += ["", "## lossd against the Triton peer (its better configuration)", "",
                  "| workload | clients | Triton | Triton p50 / lossd p50 | lossd calls/s / "
                  "Triton's |", "|---|---|---|---|---|"]
        for r in peers:
            lines.append(f"| {r['workload']} | {r['concurrency']} | {r['triton_variant']} | "
                         f"{_f(r['triton_over_lossd_p50'])} | "
                         f"{_f(r['lossd_over_triton_calls'])} |")
        lines += ["", "Above 1: lossd is faster (lower p50, more calls/s)."]

    lines += ["", "## Server memory (lossd: a fresh server per workload)", "",
              "| workload | payload MiB | lossd idle RSS MiB | lossd peak, 1 client | lossd peak - "
              "idle (x payload) | lossd peak, 8 clients | transport floor peak - RSS before, 1 "
              "client (x payload) | lossd startup s |", "|---|---|---|---|---|---|---|---|"]
    for w in result["workloads"]:
        rss = result["rss"].get(w["name"])
        if not rss:
            continue
        idle = rss["idle_fresh"]
        p1 = rss.get("c1", {}).get("peak")
        p8 = rss.get("c8", {}).get("peak")
        big = w["payload_bytes"] >= 2**20
        growth = f"{(p1 - idle) / w['payload_bytes']:.2f}" if p1 and big else "-"
        fl = [c for c in result["cases"] if c["workload"] == w["name"]
              and c["concurrency"] == 1 and c["kind"].startswith("floor_")]
        fgrowth = "-"
        if fl and big:
            fgrowth = ", ".join(
                f"{c['kind'].removeprefix('floor_')} "
                f"{(c['server_rss']['peak'] - c['server_rss']['before']) / w['payload_bytes']:.2f}"
                for c in fl)
        lines.append(f"| {w['name']} | {_mib(w['payload_bytes'])} | {_mib(idle)} | {_mib(p1)} | "
                     f"{growth} | {_mib(p8)} | {fgrowth} | {rss['startup_s']} |")

    staged = [c for c in result["cases"] if c.get("server_stages_ms")]
    if staged:
        keys = ["decode", "queue", "compute", "encode", "handler_other", "request",
                "outside_handler"]
        lines += ["", "## Where lossd's time goes (lossd's own stage timers, mean ms per call)",
                  "", "| workload | clients | client | " + " | ".join(keys) + " | mean latency |",
                  "|---" * (len(keys) + 4) + "|"]
        for c in staged:
            st = c["server_stages_ms"]
            client = "LossClient" if c["kind"] == "lossd" else "one-copy"
            lines.append(f"| {c['workload']} | {c['concurrency']} | {client} | "
                         + " | ".join(_f(st.get(k)) for k in keys) + f" | {_f(c['mean_ms'])} |")
        lines += ["", "From `lossd_stage_duration_seconds` and `lossd_request_duration_seconds` "
                  "scraped before and after each case. handler_other = request - stages (in "
                  "the handler but in no stage: metrics, bookkeeping); "
                  "outside_handler = client-observed mean - request (client library, grpcio "
                  "on both sides, the wire)."]

    lines += ["", "## CPU and page faults per call (server process; clients summed)", "",
              "| workload | clients | measured | server CPU ms | client CPU ms | server page "
              "faults | other load |", "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if c["kind"] == "compute":
            continue
        lines.append(f"| {c['workload']} | {c['concurrency']} | {c['kind']} | "
                     f"{_f(c['server_cpu_ms_per_call'])} | {_f(c['client_cpu_ms_per_call'])} | "
                     f"{_f(c['server_page_faults_per_call'], 0)} | "
                     f"{c['load']['other_cpu_frac']:.0%} |")

    stages = result.get("stages") or {}
    if stages:
        keys = ["build", "serialize", "parse", "decode", "validate", "to_device", "loss",
                "per_sample", "to_host", "aggregate", "encode", "result", "engine",
                "floor_client"]
        lines += ["", "## Stages of one lossd call (in-process, median ms)", "",
                  "| workload | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, st in stages.items():
            if "error" in st:
                lines.append(f"| {name} | {st['error']} |")
                continue
            lines.append(f"| {name} | " + " | ".join(_f(st.get(k)) for k in keys) + " |")
        lines += ["", "build/serialize: client; parse: grpc's deserializer (the floor pays it "
                  "too); decode .. encode: server; result: client; engine = validate .. "
                  "aggregate as one call; floor_client: the floor's one-copy request encoder."]

    copies = result.get("client_copies") or []
    if copies:
        lines += ["", "## Client-side copies of the payload (fresh process)", "",
                  "| input | payload MiB | build: copies made | alive at peak | ms | "
                  "serialize: copies | floor encoder: copies |", "|---|---|---|---|---|---|---|"]
        for c in copies:
            if "build" not in c:
                lines.append(f"| {c['kind']} | error: {c.get('error', '')[:200]} |")
                continue
            b, s, fl = c["build"], c["serialize"], c["floor_request_bytes"]
            lines.append(f"| {c['kind']} | {_mib(c['payload_bytes'])} | {b['faults']:.2f} | "
                         f"{_f(b.get('hwm'))} | {b['ms']:.0f} | {s['faults']:.2f} | "
                         f"{fl['faults']:.2f} |")
        lines += ["", "copies = new memory touched (page faults x page size) / payload; alive "
                  "at peak = VmHWM growth / payload."]
    return "\n".join(lines) + "\n"


# ---- plot -------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = result["summary"]
    names = [w["name"] for w in result["workloads"]]
    conc = sorted({r["concurrency"] for r in summary})
    series = [("transport floor", "floor", "#9aa5b1"), ("compute floor", "compute", "#c9b458"),
              ("transport + compute", "both", "#6b8e23"), ("lossd", "lossd", "#d9534f")]
    if any(r.get("triton_variant") for r in summary):
        series.append(("Triton (better of 1, 2 instances)", "triton", "#5b7fbf"))
    fig, axes = plt.subplots(2, len(conc), figsize=(6.5 * len(conc), 8.5), squeeze=False)
    x = np.arange(len(names))
    width = 0.8 / len(series)
    for j, clients in enumerate(conc):
        rows = {r["workload"]: r for r in summary if r["concurrency"] == clients}
        for i, (metric, unit) in enumerate((("p50", "p50 latency, ms (log)"),
                                            ("calls", "throughput, calls/s (log)"))):
            ax = axes[i][j]
            for k, (label, key, color) in enumerate(series):
                vals = []
                for n in names:
                    r = rows.get(n, {})
                    if metric == "p50":
                        v = r.get("floor_plus_compute_p50_ms") if key == "both" \
                            else r.get(f"{key}_p50_ms")
                    else:
                        v = r.get("combined_calls_per_s") if key == "both" \
                            else r.get(f"{key}_calls_per_s")
                    vals.append(v if v else np.nan)
                bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=label,
                              color=color)
                if key == "lossd":
                    for n, b in zip(names, bars, strict=True):
                        r = rows.get(n, {})
                        ratio = r.get("lossd_over_floor_plus_compute_p50") if metric == "p50" \
                            else r.get("lossd_over_combined_calls")
                        if ratio is not None and np.isfinite(b.get_height()):
                            ax.annotate(f"{ratio:.2f}x", (b.get_x() + b.get_width() / 2,
                                                          b.get_height()),
                                        ha="center", va="bottom", fontsize=7)
            ax.set_yscale("log")
            ax.set_xticks(x, names, rotation=20)
            ax.set_ylabel(unit)
            ax.set_title(f"{'latency' if metric == 'p50' else 'throughput'}, {clients} "
                         f"client{'s' if clients > 1 else ''}")
            ax.grid(axis="y", which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"lossd vs floors on {m['name']} ({m['device']}); labels: lossd / "
                 "(transport + compute)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Re-render results.md and bench.png from a results.json."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path, help="a results.json written by bench.run")
    a = p.parse_args(argv)
    result = json.loads(a.results.read_text())
    result["targets"] = targets(result)
    write(result, a.results.parent)
    return 0


def write(result: dict[str, Any], out: Path, *, plot_png: bool = True, **kw: Any) -> None:
    plot_png = kw.get("plot", plot_png)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(markdown(result))
    if plot_png:
        plot(result, out / "bench.png")


if __name__ == "__main__":
    raise SystemExit(main())
