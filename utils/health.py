"""Answer-health signals: what a user watches besides the loss, because good metrics can hide wrecked
language (pitfall 20).

DPO: likelihood displacement. Policy and reference log-probabilities of the same chosen answers give
the change of the chosen answers' log-probability since the start (the reference is the starting
model by default): `rewards/chosen / beta`. When it falls more than `--displacement_warn_nats`, the
chosen answers are becoming *less* likely while the margin grows, which on small data is how DPO
drops words from answers ("The movie is and charming.").

PPO: the distinct-token ratio of the rollout answers (1.0: no token repeated within an answer), the
EOS rate and the mean answer length, compared with the first step's: answers that stop ending at EOS,
start repeating or grow to several times their first length are the first sign of an actor drifting to
text its reward model over-scores (a reward model trained on pairs whose chosen answers are the longer
ones learns "longer is better", and PPO climbs it by saying a clause again and again).

Reward model: a held-out pairwise loss near log 2 means the scores hardly separate chosen from rejected,
however high the accuracy (a margin of 0.006 still orders 98% of the pairs). Step 3 whitens its
advantages, so it turns such a reward model's noise into full-size updates: a tiny Falcon (tied
embeddings) whose held-out loss was 0.690 sent PPO from 100% to 2% preferred answers, silently.
"""
from __future__ import annotations

import math

import torch

# Held-out loss above log 2 - this: the mean pair probability sigmoid(r_c - r_r) is below ~52.5%.
FLAT_REWARD_LOSS_GAP = 0.05


def distinct_ratio_sums(answers: torch.Tensor, action_mask: torch.Tensor, eos_id: int) -> tuple[float, int]:
    """(sum over answers of distinct tokens / tokens, number of answers) for answers [B, W] with their
    action mask [B, W]; the closing EOS is not counted, an empty answer counts as 1.0."""
    total = 0.0
    for row, mask in zip(answers.tolist(), action_mask.tolist()):
        toks = [t for t, m in zip(row, mask) if m]
        if toks and toks[-1] == eos_id:
            toks = toks[:-1]
        total += len(set(toks)) / len(toks) if toks else 1.0
    return total, len(answers)


class DisplacementMonitor:
    """Warns once when the chosen answers' log-probability falls more than `nats` below the reference's."""

    def __init__(self, nats: float, beta: float, rpo_alpha: float, logger=None):
        self.nats, self.beta, self.rpo_alpha, self.fired, self.logger = nats, beta, rpo_alpha, False, logger

    def state_dict(self) -> dict:  # kept in checkpoints: a resumed run does not warn again
        return {"fired": self.fired}

    def load_state_dict(self, st: dict | None) -> None:
        self.fired = bool((st or {}).get("fired", self.fired))

    def log(self, line: dict) -> None:
        """Log a DPO metrics line (with logps/chosen_shift added) and, the first time, the warning."""
        warning = self.check(line["step"], line)
        self.logger.log(line)
        if warning:
            self.logger.log(warning)

    def check(self, step: int, metrics: dict) -> dict | None:
        """`metrics`: a DPO train or eval line (rewards/chosen = beta x log-ratio of chosen). Returns a
        warning event for metrics.jsonl the first time the fall exceeds the threshold, else None."""
        shift = metrics["rewards/chosen"] / self.beta
        metrics["logps/chosen_shift"] = shift
        if self.fired or self.nats <= 0 or shift >= -self.nats:
            return None
        self.fired = True
        remedy = (f"raise --rpo_alpha (now {self.rpo_alpha:g})" if self.rpo_alpha > 0 else "set --rpo_alpha 1")
        return {"step": step, "split": "warning", "warning": "likelihood_displacement", "logps/chosen_shift": shift,
                "message": f"chosen answers' log-probability fell {-shift:.2f} nats below the reference's (more than "
                           f"--displacement_warn_nats {self.nats:g}): likelihood displacement, which usually "
                           f"comes with answers that drop words. Likely cause: a learning rate too high for this "
                           f"data with {'no' if self.rpo_alpha <= 0 else 'too weak a'} likelihood term on the chosen "
                           f"answers. Prevent it: {remedy}, or lower --learning_rate"}


class AnswerHealthMonitor:
    """Warns once each when PPO's rollout answers stop ending at EOS, start repeating or grow, relative to
    the first step's answers (the SFT policy's habits)."""

    def __init__(self, eos_drop: float = 0.2, distinct_drop: float = 0.15, cut_lowest: bool = False,
                 cut_warn: float = 0.5, length_growth: float = 2.0):
        """cut_lowest: cut answers score the lowest (--cut_answer_score); then a first rollout in which fewer
        than `cut_warn` of the answers end gets a warning of its own. length_growth: warn when the mean
        length of the answers that end (`finished_length`) exceeds this multiple of the first step's."""
        self.eos_drop, self.distinct_drop, self.length_growth = eos_drop, distinct_drop, length_growth
        self.cut_lowest, self.cut_warn = cut_lowest, cut_warn
        self.start: dict | None = None
        self.fired: set[str] = set()

    # (metric, warning name, crossed(monitor, now, start), message with {now} and {start}); a metric a step
    # does not report (None, at step 1 or now) is not checked. finished_length counts the answers that ended:
    # one answer running to the length limit is the EOS signal's, not the length signal's.
    SIGNALS = (
        ("eos_rate", "answers_without_eos", lambda m, now, start: now < start - m.eos_drop,
         "only {now:.0%} of rollout answers end with EOS (step 1: {start:.0%}): the actor is drifting to answers "
         "that run to --max_answer_seq_len. Check the samples; consider --cut_answer_score lowest (the default "
         "with a reward model), a larger --kl_coef or a reward model trained with --synthetic_negatives"),
        ("distinct_ratio", "repeating_answers", lambda m, now, start: now < start - m.distinct_drop,
         "rollout answers repeat tokens: distinct-token ratio {now:.2f} (step 1: {start:.2f}). The reward model "
         "may over-score repeated words (probe it with step2_reward/rw_eval.py); consider a larger --kl_coef or "
         "a reward model trained with --synthetic_negatives"),
        ("finished_length", "answers_growing", lambda m, now, start: start > 0 and now > m.length_growth * start,
         "rollout answers that end average {now:.1f} tokens (step 1: {start:.1f}): if the samples say the same "
         "thing again at more length, the reward model over-scores long answers (length hacking). Probe it with "
         "step2_reward/rw_eval.py (a good answer with a clause repeated); retrain it with repeat_span among "
         "--synthetic_negative_kinds (a default kind) and more --synthetic_negatives, or raise --kl_coef"),
    )

    def state_dict(self) -> dict:
        """Kept in checkpoints: a resumed run compares with the first step of the whole run (not its own
        first step, which drifted answers would pass) and does not repeat a warning."""
        return {"start": self.start, "fired": sorted(self.fired)}

    def load_state_dict(self, st: dict | None) -> None:
        if st:
            self.start, self.fired = st.get("start"), set(st.get("fired", []))

    def check(self, step: int, stats: dict) -> list[dict]:
        """`stats`: a PPO step's metrics (eos_rate, distinct_ratio, finished_length). Returns new warning
        events."""
        if self.start is None:
            self.start = {key: stats.get(key) for key, *_ in self.SIGNALS}
            if self.cut_lowest and stats["eos_rate"] < self.cut_warn:
                return [{"step": step, "split": "warning", "warning": "answers_cut_at_start",
                         "eos_rate": stats["eos_rate"],
                         "message": f"only {stats['eos_rate']:.0%} of the first rollout's answers end with EOS within "
                                    "--max_answer_seq_len, and a cut answer scores -clip_reward_value "
                                    "(--cut_answer_score), so the reward model's scores reach few answers: raise "
                                    "--max_answer_seq_len if your answers are longer, or check that the SFT model "
                                    "learned to stop"}]
            return []
        out = []
        for key, name, crossed, message in self.SIGNALS:
            now, start = stats.get(key), self.start[key]
            if name not in self.fired and now is not None and start is not None and crossed(self, now, start):
                self.fired.add(name)
                out.append({"step": step, "split": "warning", "warning": name, key: now,
                            "message": message.format(now=now, start=start)})
        return out


def rollout_distinct_ratio(rollouts: list[dict], eos_id: int) -> float:
    """Mean distinct-token ratio of every rollout answer on every rank (an all-reduce: all ranks call it)."""
    from . import ds

    total, n = 0.0, 0
    for b in rollouts:
        t, k = distinct_ratio_sums(b["answers"], b["action_mask"], eos_id)
        total, n = total + t, n + k
    total, n = ds.all_reduce_sum([total, n]).tolist()
    return total / max(n, 1.0)


def flat_reward_warning(step: int, final_eval: dict) -> dict | None:
    """A warning event when step 2's final held-out loss is within FLAT_REWARD_LOSS_GAP of log 2
    (chance), else None. `final_eval`: the eval line (loss, accuracy, margin) of step2_reward.trainer."""
    loss = final_eval.get("loss")
    if loss is None or not math.isfinite(loss) or loss < math.log(2) - FLAT_REWARD_LOSS_GAP:
        return None
    return {"step": step, "split": "warning", "warning": "flat_reward_model", "loss": loss,
            "message": f"held-out loss {loss:.3f} is within {FLAT_REWARD_LOSS_GAP:g} of log 2 = 0.693 (mean margin "
                       f"{final_eval.get('margin', float('nan')):.3g}, accuracy {final_eval.get('accuracy', float('nan')):.2f}): "
                       "the scores barely separate chosen from rejected, and step 3 whitens its advantages, so PPO "
                       "on this reward model may follow noise. Look at its scores (step2_reward/rw_eval.py); train "
                       "it longer or with a higher --learning_rate, or check the SFT model it starts from (on noisy "
                       "human preference data a loss this close to log 2 can also be the data's own limit)"}
