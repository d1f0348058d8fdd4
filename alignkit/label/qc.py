"""Quality control of human labels: agreement with gold pairs, with each other, position bias.

Labels are compared in a/b terms (a | b | tie); skips are left out everywhere.

    cohens_kappa(x, y)      two raters on the same items (Cohen 1960)
    fleiss_kappa(counts)    many raters, items x categories count table (Fleiss 1971; items may
                            have different numbers of raters, each at least 2)
    annotator_report(rows)  per annotator: labels, gold agreement, mean Cohen's kappa against each
                            other annotator on shared pairs, share of clicks on the left answer
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import combinations

CATEGORIES = ("a", "tie", "b")


def cohens_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """(p_o - p_e) / (1 - p_e), p_e = sum_c share_x(c) share_y(c); None when p_e = 1 or no items."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} labels against {len(y)}")
    n = len(x)
    if n == 0:
        return None
    p_o = sum(u == v for u, v in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in set(cx) | set(cy)) / (n * n)
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of an items x categories table of rater counts (rows with < 2 raters dropped).

    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P_bar = mean P_i, p_j = share of all ratings in
    category j, P_e = sum_j p_j^2, kappa = (P_bar - P_e) / (1 - P_e). None when P_e = 1 or no rows."""
    rows = [list(r) for r in counts if sum(r) >= 2]
    if not rows:
        return None
    p_i = [(sum(v * v for v in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows]
    total = sum(sum(r) for r in rows)
    p_j = [sum(r[j] for r in rows) / total for j in range(len(rows[0]))]
    p_e = sum(p * p for p in p_j)
    p_bar = sum(p_i) / len(p_i)
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def _left(choice: str, swapped: bool) -> bool | None:
    """Did this a/b label click the answer shown on the left? None for tie/skip."""
    if choice not in ("a", "b"):
        return None
    return (choice == "a") != bool(swapped)


def annotator_report(rows: Sequence[dict]) -> dict:
    """QC figures from db.labels() rows: {"annotators": {name: {...}}, "fleiss_kappa", "pairs_multi"}."""
    by_pair: dict[int, dict[str, str]] = defaultdict(dict)
    stats: dict[str, dict] = {}
    for r in rows:
        s = stats.setdefault(r["annotator"], {"labels": 0, "skips": 0, "gold_n": 0, "gold_agree": 0,
                                              "left": 0, "sided": 0, "ties": 0, "reasons": 0})
        if r["choice"] == "skip":
            s["skips"] += 1
            continue
        s["labels"] += 1
        s["ties"] += r["choice"] == "tie"
        s["reasons"] += bool(r.get("reason"))
        left = _left(r["choice"], r["swapped"])
        if left is not None:
            s["sided"] += 1
            s["left"] += left
        if r["gold"] is not None:
            s["gold_n"] += 1
            s["gold_agree"] += r["choice"] == r["gold"]
        else:
            by_pair[r["pair_id"]][r["annotator"]] = r["choice"]
    kappas: dict[str, list[float]] = defaultdict(list)
    pairwise = {}
    for u, v in combinations(sorted(stats), 2):
        shared = [p for p, d in by_pair.items() if u in d and v in d]
        k = cohens_kappa([by_pair[p][u] for p in shared], [by_pair[p][v] for p in shared])
        if shared:
            pairwise[f"{u} / {v}"] = {"n": len(shared), "kappa": k}
        if k is not None:
            kappas[u].append(k)
            kappas[v].append(k)
    report = {}
    for name, s in stats.items():
        report[name] = {
            "labels": s["labels"], "skips": s["skips"], "ties": s["ties"], "reasons": s["reasons"],
            "gold_n": s["gold_n"], "gold_agreement": s["gold_agree"] / s["gold_n"] if s["gold_n"] else None,
            "kappa_mean": sum(kappas[name]) / len(kappas[name]) if kappas[name] else None,
            "left_share": s["left"] / s["sided"] if s["sided"] else None, "sided": s["sided"],
        }
    table = [[Counter(d.values())[c] for c in CATEGORIES] for d in by_pair.values()]
    return {"annotators": report, "pairwise": pairwise, "fleiss_kappa": fleiss_kappa(table),
            "pairs_multi": sum(len(d) >= 2 for d in by_pair.values())}
