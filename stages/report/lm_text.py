"""The language-model section of report.md, from the `lm` dict `kdcache.stages.report.lm` builds."""

from __future__ import annotations

from kdcache.stages.common.fmt import nbytes, num, pct, seconds, signed

NATS = ".4f"


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "not met")


def _taught(e: dict) -> str:
    if e["role"] == "teacher":
        return "hard labels (teacher)"
    if e["taught"] == "cache":
        return f"cache: {e['codec_label'] or e['cache']}"
    if e["taught"] == "teacher online":
        return f"teacher online ({e['online_teacher'].get('spec', '?')})"
    return "hard labels"


def _agreement(e: dict) -> str:
    mark = "*" if e.get("agreement_on") == "cached training tokens" else ""
    return pct(e["agreement"]) + mark


def _bytes(e: dict) -> str:
    """Bytes per token on disk, then the payload (values at their widths) in brackets."""
    if e.get("disk_bytes_per_token") is None:
        return num(e.get("bytes_per_token"), ".1f")
    return f"{num(e['disk_bytes_per_token'], '.1f')} ({num(e.get('bytes_per_token'), '.1f')})"


def _loss(e: dict) -> str:
    """`mean +- std (n)` of a seed group, or the one run's loss."""
    if e.get("n", 1) > 1:
        return f"{num(e['eval_loss'], NATS)} ± {num(e['eval_loss_std'], NATS)} ({e['n']})"
    return num(e["eval_loss"], NATS)


def students_table(lm: dict) -> str:
    """Per student (its seeds together, `lm_groups`): teacher first, then in training order."""
    best = lm["headline"]["best_cache_student"]
    head = (
        "| student | taught by | trained by | val loss, nats/token (mean ± std (seeds)) "
        "| per seed | perplexity | top-1 agrees with teacher | bytes/token on disk (payload) "
        "| store size | epochs "
        "| train time (mean) |"
    )
    lines = [head, "|" + "---|" * 11]
    for e in ([lm["teacher"]] if lm["teacher"] else []) + lm.get("groups", lm["students"]):
        per = e.get("per_seed") or {}
        cells = [
            f"**{e['name']}**" if e["name"] == best else e["name"],
            _taught(e),
            e.get("trainer") or "kdcache train",
            _loss(e),
            ", ".join(f"{num(v, '.3f')}" for v in per.values()) if len(per) > 1 else "-",
            num(e["eval_perplexity"], ".2f"),
            "-" if e["role"] == "teacher" else _agreement(e),
            _bytes(e),
            nbytes(e.get("store_bytes")),
            num(e["epochs"]),
            seconds(e["train_seconds"]),
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    # A codec's words may hold "|" (KL(p || q)): escaped, or it would split the cell.
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def caches_table(lm: dict) -> str:
    head = (
        "| cache | codec | bytes/token on disk (payload) | codec's error | store size "
        "| teacher time (paid once) "
        "| online KD: E x t | measured online | saved (E - 1) x t |"
    )
    lines = [head, "|" + "---|" * 9]
    for c in lm["caches"]:
        if "error" in c:
            lines.append(_row([f"`{c['url']}`", f"could not open it: {c['error']}"] + ["-"] * 7))
            continue
        cells = [
            f"`{c['url']}`",
            c["codec_label"],
            _bytes(c),
            c["codec_error"] or "-",
            nbytes(c["total_bytes"]),
            seconds(c["teacher_seconds"]),
            f"E = {c['epochs']}: {seconds(c['online_equivalent_seconds'])}",
            seconds(c["online_measured_seconds"]),
            seconds(c["saved_seconds"]),
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def _paired(p: dict | None) -> str:
    if not p or len(p["seeds"]) < 2:
        return ""
    return f", per seed {signed(p['mean'])} ± {num(p['std'], '.4f')} over seeds {p['seeds']}"


def headline(lm: dict) -> str:
    groups = lm.get("groups", lm["students"])
    h, by_name = lm["headline"], {e["name"]: e for e in groups}
    loss = lambda n: _loss(by_name[n])  # noqa: E731
    targets = list(h["targets"].values())
    goal = h.get("target_values", {})
    near, over = goal.get("near_online"), goal.get("over_hard")
    parts = []
    s = h["sampled_student"]
    if s is None:
        parts.append("No sampled-cache student.")
    else:
        sampled = by_name[s]
        parts.append(
            f"Sampled-cache student **{s}** ({_bytes(sampled)} "
            f"bytes/token on disk (payload)): validation loss {loss(s)} nats/token"
        )
        o, k = h["online_student"], h["matched_topk_student"]
        parts.append(
            f", {signed(h['sampled_minus_online'])} vs the online-KD student {o} ({loss(o)}"
            + _paired(h.get("sampled_minus_online_paired"))
            + (f"; target within {near:g}: {_verdict(targets[0])}" if near is not None else "")
            + ")"
            if o
            else ", no online-KD student to compare with"
        )
        parts.append(
            f" and {signed(h['sampled_minus_matched_topk'])} vs the topk student of the nearest "
            f"bytes/token on disk {k} ({_bytes(by_name[k])} bytes/token, "
            f"{loss(k)}"
            + _paired(h.get("sampled_minus_matched_topk_paired"))
            + f"; target better: {_verdict(targets[1])})."
            if k
            else " and no topk student to compare with."
        )
    b, hard = h["best_cache_student"], h["hard_student"]
    w = h.get("worst_cache_student")
    if b and hard:
        parts.append(
            f" Hard labels only {hard}: {loss(hard)}. Best cache student **{b}** ({loss(b)}): "
            f"{signed(h['hard_minus_best_cache'])} nats/token better"
        )
        if w:
            parts.append(
                f"; the least good, {w} ({loss(w)}): {signed(h['hard_minus_worst_cache'])}"
                + (
                    f" (target every one >= {over:g}: {_verdict(targets[2])})"
                    if over is not None
                    else ""
                )  # fmt: skip
            )
        parts.append(".")
    return "".join(parts)


def lm_markdown(lm: dict) -> list[str]:
    lines = [
        "## Language model",
        "",
        f"Runs in `{lm['folder']}`.",
        "",
        headline(lm),
        "",
        students_table(lm),
        "",
        "Validation loss is each run's final epoch on its eval data, the mean over a student's "
        "seeds (± the sample standard deviation, seed count in brackets); perplexity is exp of "
        "the mean. Agreement is the share of validation tokens where the model's top-1 next "
        "token is the teacher's, averaged over seeds (* the trainer's figure on cached training "
        "tokens, when the models were not loaded).",
        "",
    ]
    if lm.get("unfinished"):
        lines += [f"Unfinished (no summary.json yet): {', '.join(lm['unfinished'])}.", ""]
    if lm["caches"]:
        lines += ["### The caches", "", caches_table(lm), ""]
        lines += [
            "t = the teacher's forward time over the train split, paid once by `kdcache "
            "precompute`; E = the epochs of the students that read the cache; measured online "
            "= the online-KD student's teacher seconds per epoch times E.",
            "",
        ]
    lines += [f"![{p[:-4]}]({p})" for p in lm.get("plots", [])]
    return lines + [""] if lm.get("plots") else lines


def terminal(lm: dict) -> tuple[str, str]:
    return students_table(lm), headline(lm)
