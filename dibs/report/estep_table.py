"""The report's E-step diagnostics section: per configuration, how its strategy spread the samples (logged by
every E-step) and, for GVM allocations, the alloc/* scalars."""

from __future__ import annotations

from typing import Any

from dibs.core.tags import ALLOC_TAGS, SAMPLING_TAGS
from dibs.report.cells import _pm, cost, pct, table
from dibs.report.grid import Grid

__all__ = ["ALLOC_COLUMNS", "SAMPLING_COLUMNS", "estep_section"]

SAMPLING_COLUMNS = {  # the E-step table's columns logged by every strategy: title, cell format
    "sampling/samples_per_prompt": ("Samples / prompt", ".2f"),
    "sampling/max_per_prompt": ("Max / prompt", ".1f"),
    "sampling/zero_sample_frac": ("Prompts without a sample (%)", "pct"),
    "rollout/equal_reward_frac": ("Equal-reward samples (%)", "pct"),
}
ALLOC_COLUMNS = {  # the E-step table's alloc/* columns: title, cell format (what each is: dibs.core.tags)
    "alloc/zero_frac": ("Zero-sample prompts (%)", "pct"),
    "alloc/gini": ("Gini", ".3f"),
    "alloc/variance_vs_uniform": ("Variance vs uniform", ".3f"),
    "alloc/pilot_unsolved_frac": ("Pilot-unsolved (%)", "pct"),
    "alloc/predicted_accept": ("Predicted accept (%)", "pct"),
    "alloc/realised_accept": ("Realised accept (%)", "pct"),
}


def estep_section(grid: Grid, data: dict[str, Any]) -> list[str]:
    """Per configuration: generated samples, the pilot's share, accepted samples per iteration and the means of the
    alloc/* scalars (columns left out when no run logs them; "–" for a configuration that does not)."""
    estep = data["estep"]
    tags = [tag for tag in estep["alloc_tags"] if tag in ALLOC_COLUMNS]
    sampled = [tag for tag in SAMPLING_COLUMNS if tag in estep.get("sampling_tags", [])]
    header = ["Configuration", "Generated samples", "Pilot share (%)", "Accepted / iteration"]
    header += [SAMPLING_COLUMNS[tag][0] for tag in sampled] + [ALLOC_COLUMNS[tag][0] for tag in tags]
    rows = []
    for label in grid.configurations:
        row = estep["configurations"][label]
        cells = [label, cost(row["generated_samples"], "samples"), pct(row["pilot_share"])]
        cells.append(_pm(row["accepted_per_iteration"], ",.1f"))
        for tag in sampled:
            fmt = SAMPLING_COLUMNS[tag][1]
            value = row["sampling"][tag]
            cells.append(pct(value) if fmt == "pct" else _pm(value, fmt))
        for tag in tags:
            fmt = ALLOC_COLUMNS[tag][1]
            cells.append(pct(row["alloc"][tag]) if fmt == "pct" else _pm(row["alloc"][tag], fmt))
        rows.append(cells)
    lines = [
        "## E-step diagnostics",
        "",
        *table(header, rows),
        "",
        "Each cell is a per-run number, then mean ± std over seeds; a mean over iterations counts each EM iteration "
        "once (a resumed run's re-run iteration keeps its latest values) and skips iterations where the scalar is "
        "NaN.",
        "",
        "- *Generated samples*: the run's final `cost/samples`, every sample generated for training, the allocation "
        "pilot included.",
        "- *Pilot share*: the run's last `pilot/samples_cum` divided by its generated samples (0 for a run without a "
        "pilot).",
        "- *Accepted / iteration*: the mean over iterations of `rollout/accept_rate` × `rollout/samples`, the number "
        "of an iteration's training samples that the verifier accepted.",
    ]
    lines += [
        f"- *{SAMPLING_COLUMNS[tag][0]}*: the mean over iterations of {SAMPLING_TAGS[tag]} (`{tag}`)."
        for tag in sampled
    ]
    lines += [f"- *{ALLOC_COLUMNS[tag][0]}*: the mean over iterations of {ALLOC_TAGS[tag]} (`{tag}`)." for tag in tags]
    if tags:
        lines.append("")
        lines.append(
            "The alloc/* scalars are logged by GVM allocation runs only: – marks a configuration that does not log "
            "them (uniform allocation)."
        )
    return lines
