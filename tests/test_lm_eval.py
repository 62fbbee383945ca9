"""EleutherAI's lm-evaluation-harness evaluates an `export --hf` directory with no custom code, offline, and
its per-item log-likelihoods are our scorer's (dist_gpt.eval.hellaswag) on the same items."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, subprocess_env
from test_hellaswag import random_model, write_hellaswag

from dist_gpt.eval import hellaswag

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model imports it

# A task over a local JSONL in HellaSwag's format: context = ctx, choices = the endings (lm-eval puts its
# target_delimiter " " between them, as our scorer does), right answer = label.
TASK_YAML = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

HARNESS = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
hf_dir, task_dir = sys.argv[1:3]
out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": hf_dir, "dtype": "float32"}, tasks=["hellaswag_local"],
                              task_manager=TaskManager(include_path=task_dir), device="cpu", batch_size=4, log_samples=True)
samples = sorted(out["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
print("LOGLIKELIHOODS " + json.dumps([[float(r[0][0]) for r in s["resps"]] for s in samples]))
"""


def test_lm_eval_on_the_export_gets_our_log_likelihoods(tmp_path):
    from dist_gpt.interop.hf_dir import export_hf

    items = [
        (["runs down the ladder.", "eats the roof.", "sings", "is, again, sitting"], 2),
        (["takes off his hat and waves.", "falls.", "laughs at the dog", "jumps"], 0),
        (["yes", "no", "perhaps so", "certainly not, never"], 3),
    ]
    data = write_hellaswag(tmp_path / "hellaswag_val.jsonl", items=items)
    model = random_model("rope")
    hf_dir = export_hf(model, tmp_path / "hf")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data))

    env = subprocess_env(HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(hf_dir), str(tmp_path / "tasks")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("LOGLIKELIHOODS ")]
    theirs = torch.tensor(json.loads(line.removeprefix("LOGLIKELIHOODS ")), dtype=torch.float64)

    summed, _ = hellaswag.ending_losses(model, hellaswag.read_items(data), model.config.block_size, 50257, torch.device("cpu"))
    assert theirs.shape == summed.shape == (3, 4)
    torch.testing.assert_close(-summed, theirs, atol=0, rtol=1e-4)  # log-likelihood = -(summed loss)
