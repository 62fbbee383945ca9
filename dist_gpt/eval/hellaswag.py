"""HellaSwag (Zellers et al. 2019) scored as the GPT-2 reproductions score it (llm.c's `-h 1`, build-nanogpt).

An item is a context and 4 endings, one of them right. The model is given `context + " " + ending` for each
ending, and the loss (cross-entropy) of the ending's tokens alone is summed and averaged:

  acc       the ending with the lowest summed loss (the highest log-likelihood) is the model's answer;
  acc_norm  the ending with the lowest MEAN loss per ending token is the model's answer. This is what llm.c
            and build-nanogpt call acc_norm and what their charts show (OpenAI's GPT-2 124M: 29.55 %, chance
            25 %). EleutherAI's lm-evaluation-harness normalises by the ending's length in BYTES instead, and
            builds its context differently (activity label + ctx_a + ctx_b, with WikiHow's "[title]"
            markers removed): its hellaswag acc_norm of the same model is a different number. Compare like
            with like.

The context is the file's `ctx` field, the ending " " + ending (GPT-2's BPE starts a word with its space), as
the reproductions tokenize them. A row longer than the model's block_size loses tokens from the start of the
context. Padded vocabulary rows (ids >= 50257) are not tokens: they are left out of the softmax, as the
`export --hf` model (which has no such rows) leaves them out, so both score alike.

The file is the official JSONL (rowanz/hellaswag `data/hellaswag_val.jsonl`: 10,042 items; fields ctx,
ctx_a, ctx_b, endings, label, ...): downloaded once into the cache, or read from a local copy.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dist_gpt import tokenizer
from dist_gpt.errors import UserError

SOURCE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = {"val": 10042}  # the split the reproductions report, and its item count (the test split has no labels)
NUM_ENDINGS = 4
DEFAULT_BATCH_ITEMS = 4  # items per forward: 16 rows; GPT-2's logits for them are ~0.5 GB in fp32

# (rows, T) ids, (rows, T) bool mask -> (N, vocab) logits at the masked positions: a GPT, or Strategy.eval_logits
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cache_dir() -> Path:
    """Where downloaded task files live: $DIST_GPT_CACHE/hellaswag, else ~/.cache/dist_gpt/hellaswag."""
    root = os.environ.get("DIST_GPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_gpt"
    return Path(root).expanduser() / "hellaswag"


def data_file(local: str | os.PathLike = "", split: str = "val", url: str = SOURCE_URL, cache: Path | None = None) -> Path:
    """The JSONL to score: `local` if given (it must exist), else the cached download, fetched on first use."""
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise UserError(f"HellaSwag file {path} does not exist: give the hellaswag_{split}.jsonl you downloaded, or leave it out to download it")
        return path
    path = (cache or cache_dir()) / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    source = url.format(split=split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(source, timeout=60) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, path)  # several ranks may download at once: each renames a whole file into place
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download HellaSwag ({reason}): fetch {source} and put it at {path}, or pass its path (--data FILE / train.eval_task_data)") from None
    return path


@dataclass(frozen=True)
class Item:
    """One question, tokenized: the context's ids, each ending's ids, the right ending's index."""

    context: list[int]
    endings: list[list[int]]
    label: int


def read_items(path: str | os.PathLike, limit: int = 0) -> list[Item]:
    """The first `limit` items of a HellaSwag JSONL (0 = all), tokenized. UserError on a malformed line."""
    items = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if limit and len(items) >= limit:
                break
            try:
                example = json.loads(line)
                context, endings, label = example["ctx"], example["endings"], int(example["label"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{number}: not a HellaSwag item ({type(e).__name__}: {e}): each line needs ctx, endings (4) and label") from None
            if len(endings) != NUM_ENDINGS or not 0 <= label < NUM_ENDINGS:
                raise UserError(f"{path}:{number}: a HellaSwag item has {NUM_ENDINGS} endings and a label 0-3, this one {len(endings)} and {label}")
            items.append(Item(tokenizer.encode(context), [tokenizer.encode(" " + ending) for ending in endings], label))
    if not items:
        raise UserError(f"{path} holds no HellaSwag items: give the JSONL file (one item a line)")
    return items


@dataclass
class Scores:
    """Counts, so that ranks' shares add up exactly; acc and acc_norm follow from them."""

    items: int = 0
    correct: int = 0  # lowest summed loss was the label
    correct_norm: int = 0  # lowest mean loss per token was the label

    @property
    def acc(self) -> float:
        return self.correct / self.items if self.items else math.nan

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.items if self.items else math.nan

    def record(self, prefix: str = "hellaswag") -> dict:
        return {f"{prefix}_acc": self.acc, f"{prefix}_acc_norm": self.acc_norm, f"{prefix}_items": self.items}


@torch.no_grad()
def ending_losses(logits_fn: LogitsFn, items: Sequence[Item], block_size: int, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, mean loss per token) of every ending of every item, each of shape (len(items), 4), in one
    forward. Rows are right-padded; causal attention keeps the padding from touching the real tokens."""
    rows, masks = [], []
    for item in items:
        for ending in item.endings:
            row = (item.context + ending)[-(block_size + 1) :]  # input row[:-1], targets row[1:]
            scored_tokens = min(len(ending), len(row) - 1)  # the row's first token is never a target
            rows.append(row)
            masks.append([0] * (len(row) - scored_tokens) + [1] * scored_tokens)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row)
        scored[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    ids, scored = ids.to(device), scored.to(device)
    targets = scored[:, 1:]
    logits = logits_fn(ids[:, :-1], positions=targets)  # only the positions that predict an ending token (~1/3 of them)
    losses = F.cross_entropy(logits[:, :vocab_size].float(), ids[:, 1:][targets], reduction="none")  # padded vocabulary rows are not tokens
    row_of = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(targets)[targets]
    summed = torch.zeros(len(rows), device=device).index_add_(0, row_of, losses)
    mean = summed / targets.sum(dim=1).clamp(min=1)
    return summed.view(-1, NUM_ENDINGS).double(), mean.view(-1, NUM_ENDINGS).double()


def score(
    logits_fn: LogitsFn,
    items: Sequence[Item],
    block_size: int,
    vocab_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch_items: int = DEFAULT_BATCH_ITEMS,
    progress: bool = False,
) -> Scores:
    """This rank's share of the items (r, r + world, r + 2 world, ...), scored; the caller sums Scores over
    ranks. Every rank runs the same number of forwards (a sharded model gathers weights inside forward), a
    rank with nothing left scoring a throwaway item."""
    mine = list(items[rank::world_size])
    forwards = math.ceil(math.ceil(len(items) / world_size) / batch_items)
    scores = Scores()
    with tqdm(total=len(mine), unit="item", desc="hellaswag", disable=None if progress else True, dynamic_ncols=True) as bar:
        for i in range(forwards):
            batch = mine[i * batch_items : (i + 1) * batch_items]
            summed, mean = ending_losses(logits_fn, batch or items[:1], block_size, vocab_size, device)
            if not batch:
                continue
            labels = torch.tensor([item.label for item in batch], device=summed.device)
            scores.items += len(batch)
            scores.correct += int((summed.argmin(dim=1) == labels).sum())
            scores.correct_norm += int((mean.argmin(dim=1) == labels).sum())
            bar.update(len(batch))
            bar.set_postfix(acc_norm=f"{scores.acc_norm:.4f}", refresh=False)
    return scores
