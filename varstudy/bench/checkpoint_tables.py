"""The checkpointing benchmark's tables: one row per run with the cost model beside the measured
time, summary.csv (the issue's targets per strategy) and the printed report. DataFrame in,
DataFrame (or text) out; nothing here runs a scan."""

from __future__ import annotations

import pandas as pd

from varstudy.bench.checkpoint import SUMMARY_COLUMNS
from varstudy.checkpointing import schedules as sch

NAN_RESULT = dict(time_s=float("nan"), main_cpu_s=float("nan"), fast_peak_bytes=float("nan"),
                  interval=0, recompute_steps=float("nan"), stall_s=float("nan"))


def row(workload, name, n, slots, ratio, res, t_f, t_b, *, repeats=1, skipped="") -> dict:
    """One vs_n.csv / vs_ratio.csv row (columns ``COLUMNS``) from a run's result ``res`` and the
    calibration (t_f, t_b in seconds): measured time per step beside the cost model's."""
    strategy = {"multistage_host": "multistage", "multistage_disk": "multistage"}.get(name, name)
    interval = res["interval"] or n
    if strategy in ("revolve", "multistage"):
        model = sch.model_cost_per_step(strategy, n, slots, interval, t_b / t_f)
    else:  # store_all, torch_checkpoint: one (untaped or taped) forward + one re-tape/adjoint
        model = sch.model_cost_per_step("store_all", n, slots, 1, t_b / t_f)
    per_step = res["time_s"] / n
    return dict(workload=workload, strategy=name, n_steps=n, slots=slots,
                interval=res["interval"], ratio=ratio, time_s=res["time_s"],
                time_per_step_ms=1e3 * per_step, cost_fwd_units=per_step / t_f,
                model_cost_fwd_units=model, fast_peak_bytes=res["fast_peak_bytes"],
                fast_peak_mib=res["fast_peak_bytes"] / 2**20,
                recompute_steps=res["recompute_steps"], stall_s=res["stall_s"],
                overhead_vs_plain=per_step / (t_f + t_b),
                model_overhead_vs_plain=model * t_f / (t_f + t_b),
                overhead_vs_store_all=float("nan"), t_f_ms=1e3 * t_f, t_b_ms=1e3 * t_b,
                repeats=repeats, main_cpu_s=res["main_cpu_s"], skipped=skipped)


def add_vs_store_all(df: pd.DataFrame) -> pd.DataFrame:
    """Fill ``overhead_vs_store_all``: time over store_all's at the same N (NaN without it)."""
    base = df[df["strategy"] == "store_all"].set_index("n_steps")["time_s"]
    df["overhead_vs_store_all"] = df["time_s"] / df["n_steps"].map(base)
    return df


def summarize(vs_n: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: the issue's targets. overhead = overhead_vs_plain; change = (at N_max / at
    N_min - 1) in %, ``within_10pct`` |change| <= 10 (NaN where a point was skipped);
    not_slower_than_revolve: time per step <= revolve's at every N where both ran (NaN for
    revolve itself); fast-tier peak min/max over N (its flatness)."""
    n_lo, n_hi = int(vs_n["n_steps"].min()), int(vs_n["n_steps"].max())
    rev = vs_n[vs_n["strategy"] == "revolve"].set_index("n_steps")["time_s"]
    rows = []
    for strategy in vs_n["strategy"].unique():
        d = vs_n[vs_n["strategy"] == strategy].set_index("n_steps")
        lo, hi = d["overhead_vs_plain"].get(n_lo), d["overhead_vs_plain"].get(n_hi)
        m_lo, m_hi = d["model_overhead_vs_plain"].get(n_lo), d["model_overhead_vs_plain"].get(n_hi)
        change = 100 * (hi / lo - 1)
        ran = d["time_s"].notna()
        if strategy == "revolve" or rev.empty:
            le, slower = float("nan"), ""
        else:
            both = [n for n in d.index[ran] if n in rev.index and pd.notna(rev[n])]
            bad = [int(n) for n in both if d.loc[n, "time_s"] > rev[n]]
            le = (not bad) if both else float("nan")
            slower = " ".join(map(str, bad))
        skipped = d.index[d["skipped"].fillna("").astype(str) != ""] if "skipped" in d else []
        rows.append(dict(strategy=strategy, n_min=n_lo, n_max=n_hi, overhead_at_n_min=lo,
                         overhead_at_n_max=hi, overhead_change_pct=change,
                         within_10pct=(abs(change) <= 10) if pd.notna(change) else float("nan"),
                         model_change_pct=100 * (m_hi / m_lo - 1),
                         not_slower_than_revolve=le, slower_than_revolve_at=slower,
                         fast_peak_mib_min=d["fast_peak_mib"].min(),
                         fast_peak_mib_max=d["fast_peak_mib"].max(),
                         skipped_at=" ".join(str(int(n)) for n in skipped)))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def report(vs_n, vs_ratio, wave, summary, env) -> None:
    """Print the run's tables: calibration and wall times, pivots over N, skips, targets, the
    ratio sweep and the wave workload."""
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(f"t_f = {env['t_f_ms']:.3f} ms, t_b = {env['t_b_ms']:.3f} ms, "
          f"{env['torch_threads']} thread(s), wall {env['wall_s']:.0f} s "
          f"(vs N {env['wall_vs_n_s']:.0f} s, vs ratio {env['wall_vs_ratio_s']:.0f} s, "
          f"wave {env['wall_wave_s']:.0f} s)")
    for col in ("overhead_vs_plain", "model_overhead_vs_plain", "overhead_vs_store_all",
                "fast_peak_mib"):
        print(f"-- {col} (rows N, NaN = skipped or not applicable)")
        print(vs_n.pivot_table(index="n_steps", columns="strategy", values=col,
                               dropna=False).round(3))
    skipped = vs_n[vs_n["skipped"].fillna("").astype(str) != ""]
    for _, r in skipped.iterrows():
        print(f"skipped {r['strategy']} at N={r['n_steps']}: {r['skipped']}")
    print("-- targets: overhead_vs_plain at N_min / N_max (+-10%), <= revolve at every N, "
          "fast peak over N")
    print(summary.round(3).to_string(index=False))
    cols = ["strategy", "ratio", "interval", "time_per_step_ms", "overhead_vs_plain",
            "model_overhead_vs_plain"]
    print(vs_ratio[cols].round(3).to_string(index=False))
    print(wave.to_string(index=False))
