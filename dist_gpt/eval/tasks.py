"""Benchmark tasks during training (train.eval_tasks): read once at the start, scored every eval_task_every steps.

Every rank scores its share of the items and the counts are summed over ranks, so the numbers do not depend
on the world size. Each task's record (e.g. hellaswag_acc, hellaswag_acc_norm, hellaswag_items) goes to the
console, metrics.jsonl and wandb like the val loss, and `plot` / `compare` show it.
"""

from __future__ import annotations

import torch

from dist_gpt.config import Config
from dist_gpt.eval import hellaswag
from dist_gpt.runtime.distributed import DistEnv, all_reduce_sum


class EvalTasks:
    def __init__(self, config: Config, env: DistEnv):
        t = config.train
        self.every, self.max_steps, self.env = t.eval_task_every, t.max_steps, env
        self.block_size, self.vocab_size = config.model.block_size, config.model.tokenizer_vocab_size
        # config.check allows only the tasks in config.CHOICES (HellaSwag). Read (downloading if need be)
        # before the first step: a missing file stops the run now, not hours in.
        self.items = {name: hellaswag.read_items(hellaswag.data_file(t.eval_task_data), t.eval_task_limit) for name in t.eval_tasks}

    def due(self, step: int) -> bool:
        return bool(self.items) and (bool(self.every and step % self.every == 0) or step == self.max_steps)

    def run(self, strategy) -> dict:
        """{task}_acc, {task}_acc_norm, {task}_items for every task; every rank must call it."""
        record = {}
        for name, items in self.items.items():
            mine = hellaswag.score(strategy.eval_logits, items, self.block_size, self.vocab_size, self.env.device, self.env.rank, self.env.world_size)
            counts = all_reduce_sum(torch.tensor([mine.items, mine.correct, mine.correct_norm], dtype=torch.long, device=self.env.device))
            record.update(hellaswag.Scores(*map(int, counts.tolist())).record(name))
        return record


def format_scores(step: int, record: dict) -> str:
    tasks = sorted({key.rsplit("_acc", 1)[0] for key in record if key.endswith("_acc")})
    return f"step {step:6d} | " + " | ".join(f"{t} acc {100 * record[f'{t}_acc']:.2f}% acc_norm {100 * record[f'{t}_acc_norm']:.2f}% ({record[f'{t}_items']} items)" for t in tasks)
