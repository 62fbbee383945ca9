"""The table the autotuner prints: each trial, the choice, and the overrides to reuse it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dist_gpt.autotune.memory import MB
from dist_gpt.autotune.search import Outcome


@dataclass
class Report:
    outcome: Outcome
    header: str
    strategy_name: str
    from_cache: Path | None = None
    trials: int = 0
    seconds: float = 0.0
    header_shown: bool = False  # logged before the trials ran: render() does not repeat it

    def render(self) -> str:
        o = self.outcome
        lines = ([] if self.header_shown else [self.header]) + ["  micro-batch  ckpt  predicted MB  measured MB      tokens/s  result"]
        for row in o.tried:
            measured = f"{row.result.peak_bytes / MB:,.0f}" if row.result.peak_bytes and not row.result.oom else "-"
            speed = f"{row.result.tokens_per_s:,.0f}" if row.result.tokens_per_s else "-"
            note = f" [{row.result.note}]" if row.result.note else ""
            lines.append(f"  {row.micro_batch:>11}  {'yes' if row.checkpointing else 'no':>4}  {row.predicted_bytes / MB:>12,.0f}  {measured:>11}  {speed:>12}  {row.outcome}{note}")
        lines.append(f"choice: micro-batch {o.micro_batch} x grad-accum {o.grad_accum} x world {o.global_batch // (o.micro_batch * o.grad_accum)} = global batch {o.global_batch}"
                     + (" with activation checkpointing" if o.checkpointing else ""))
        lines += [f"  note: {n}" for n in o.notes]
        fragment = f"train.micro_batch_size={o.micro_batch} train.global_batch_size={o.global_batch}" + (" parallel.activation_checkpointing=true" if o.checkpointing else "")
        lines.append(f"reuse: {fragment}")
        if self.strategy_name == "deepspeed":
            ds = {"train_micro_batch_size_per_gpu": o.micro_batch, "gradient_accumulation_steps": o.grad_accum, "train_batch_size": o.global_batch}
            lines.append(f"deepspeed json: {json.dumps(ds)}")
        if self.from_cache:
            lines.append(f"used the cached result {self.from_cache} (no trials run; --no-cache or delete it to search again)")
        else:
            lines.append(f"searched in {self.trials} trials, {self.seconds:.1f} s")
        return "\n".join(lines)
