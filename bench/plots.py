"""PNG plots of a bench/run result (matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODE_ORDER = ("kernel", "bare", "oomguard_kill", "bare_grow", "oomguard_grow")
COLOURS = {"kernel": "#7f7f7f", "bare": "#1f77b4", "oomguard_kill": "#d62728",
           "bare_grow": "#17becf", "oomguard_grow": "#ff7f0e"}


def make_plots(results: dict[str, Any], outdir: Path, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    res = results.get("resolution", {})
    sizes = [s for s in ("64M", "1G") if s in res]
    if sizes:
        fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
        for ax, size in zip(axes[0], sizes, strict=True):
            modes = [m for m in MODE_ORDER if res[size]["modes"].get(m, {}).get("n")]
            data = [res[size]["modes"][m]["samples_ms"] for m in modes]
            bp = ax.boxplot(data, whis=(5, 95), showfliers=False, patch_artist=True)
            for patch, m in zip(bp["boxes"], modes, strict=True):
                patch.set_facecolor(COLOURS[m])
                patch.set_alpha(0.35)
            for i, (m, xs) in enumerate(zip(modes, data, strict=True), start=1):
                jitter = [i + 0.18 * ((k * 0.618) % 1 - 0.5) for k in range(len(xs))]
                ax.scatter(jitter, xs, s=9, color=COLOURS[m], alpha=0.8, zorder=3)
            ax.set_xticks(range(1, len(modes) + 1), modes, rotation=15)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("hog's last timestamp -> resolved (ms, log)")
            ax.set_title(f"OOM resolution latency, {size}iB memcg "
                         f"(n={min(len(d) for d in data) if data else 0} per mode)")
            ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = outdir / f"resolution{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    notify = results.get("notify", {})
    counts = sorted(int(k) for k in notify if k.isdigit())
    if counts:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for c in counts:
            xs = notify[str(c)]["samples_ms"]
            ax.scatter([c] * len(xs), xs, s=8, color="#999999", alpha=0.6)
        ax.plot(counts, [notify[str(c)]["median_ms"] for c in counts], "o-", label="p50")
        ax.plot(counts, [notify[str(c)]["p99_ms"] for c in counts], "s--", label="p99")
        raw = notify.get("raw", {})
        if raw.get("median_ms") is not None:
            ax.axhline(raw["median_ms"], color="#2ca02c", lw=1, ls=":",
                       label="floor p50 (blocking read, no epoll)")
            ax.axhline(raw["p99_ms"], color="#2ca02c", lw=1, ls="-.",
                       label="floor p99")
        ax.set_xscale("log")
        ax.set_xlabel("watched cgroups (one of them OOMs)")
        ax.set_ylabel("hog's last timestamp -> eventfd read returns (ms)")
        ax.set_title("OOM notification latency vs watched cgroups")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = outdir / f"notify{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
