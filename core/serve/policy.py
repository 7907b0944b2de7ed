"""How many tokens to draft per slot this step, from measured acceptance and step times.

With many busy slots a verify batch costs more rows (on CPU without native bf16 every row is a
GEMV of its own, so a step's cost grows with its rows), while a draft only pays if it is accepted.
Each step we pick the draft length k that maximises expected tokens per second:
  tokens(k) = n_plain + n_mtp * (1 + sum_{i<k} prod_{j<=i} c_j)   (c_j: acceptance at position j
  given the earlier ones were accepted, counted over all slots)
  time(k)   = sum of the measured forward times of the step's sub-batches (<= max_rows rows each)
              + n_mtp * k * (measured time per draft step)
Row counts never measured yet are tried first (a short exploration), so the table fills itself.
`fixed` always drafts the configured maximum (reproducible acceptance, e.g. for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = 0.2  # EMA weight of a new timing


@dataclass
class DraftPolicy:
    draft_max: int
    adaptive: bool = True
    max_rows: int = 16
    step_s: dict[int, float] = field(default_factory=dict)  # rows -> EMA forward seconds
    draft_step_s: float | None = None
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    last: dict = field(default_factory=dict)

    def __post_init__(self):
        self.reached = self.reached or [0] * self.draft_max
        self.accepted = self.accepted or [0] * self.draft_max

    def observe_forward(self, rows: int, seconds: float) -> None:
        old = self.step_s.get(rows)
        self.step_s[rows] = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds

    def observe_draft(self, n_steps: int, seconds: float) -> None:
        if n_steps:
            s = seconds / n_steps
            d = self.draft_step_s
            self.draft_step_s = s if d is None else (1 - ALPHA) * d + ALPHA * s

    def observe_accept(self, n_draft: int, n_accepted: int) -> None:
        for i in range(min(n_draft, n_accepted + 1)):
            self.reached[i] += 1
        for i in range(n_accepted):
            self.accepted[i] += 1

    def _expected_accepted(self, k: int) -> float:
        total, p = 0.0, 1.0
        for i in range(k):
            p *= self.accepted[i] / self.reached[i] if self.reached[i] else 1.0
            total += p
        return total

    def _groups(self, n_plain: int, n_mtp: int, k: int) -> list[int]:
        """Row counts of the sub-batches the engine will run (slots packed in order)."""
        sizes, cur = [], 0
        for rows in [1] * n_plain + [1 + k] * n_mtp:
            if cur + rows > self.max_rows:
                sizes.append(cur)
                cur = 0
            cur += rows
        return sizes + [cur] if cur else sizes

    def choose(self, n_plain: int, n_mtp: int) -> int:
        if not self.adaptive or n_mtp == 0:
            self.last = {"n_draft": self.draft_max, "reason": "fixed draft length"}
            return self.draft_max
        scores = {}
        for k in range(self.draft_max, -1, -1):
            groups = self._groups(n_plain, n_mtp, k)
            if any(r not in self.step_s for r in groups) or (k and self.draft_step_s is None):
                self.last = {"n_draft": k, "reason": f"measuring step time at {groups} rows"}
                return k
            t = sum(self.step_s[r] for r in groups) + n_mtp * k * (self.draft_step_s or 0.0)
            scores[k] = (n_plain + n_mtp * (1 + self._expected_accepted(k))) / t
        best = max(scores, key=scores.get)
        self.last = {
            "n_draft": best,
            "reason": f"{n_plain + n_mtp} busy slots: expected tok/s by draft length "
            + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(scores.items())),
        }
        return best

    def describe(self) -> dict:
        return {
            "mode": "adaptive" if self.adaptive else "fixed",
            "draft_max": self.draft_max,
            **self.last,
            "acceptance_given_previous": [
                a / r if r else None for a, r in zip(self.accepted, self.reached)
            ],
            "step_ms_by_rows": {r: round(s * 1e3, 3) for r, s in sorted(self.step_s.items())},
            "draft_step_ms": round(self.draft_step_s * 1e3, 3) if self.draft_step_s else None,
        }
