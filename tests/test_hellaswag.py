"""HellaSwag: the scorer against answers known in advance, against transformers on the export, the CLI, the
download into the cache (a real HTTP server on 127.0.0.1), and the in-loop task on 2 ranks == 1 rank."""

from __future__ import annotations

import functools
import http.server
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, read_jsonl, run_python, tiny_overrides

from dist_gpt import tokenizer
from dist_gpt.errors import UserError
from dist_gpt.eval import hellaswag
from dist_gpt.model import GPT, GPTConfig

CONTEXT = "A man is sitting on a roof. He"
# (endings, label). The unigram model below prefers " yes" to every other token: an ending of k " yes" has
# summed loss k*a and mean a; " no" costs b > a per token. Hence the predictions in EXPECTED.
ITEMS = [
    (["yes yes yes", "no", "no no", "no no no"], 0),  # sum picks 1 (b < 3a), mean picks 0: acc wrong, acc_norm right
    (["no no", "yes", "no", "no yes"], 1),  # both pick 1: right
    (["yes", "no", "no", "no no"], 3),  # both pick 0: wrong
]
EXPECTED = {"items": 3, "correct": 1, "correct_norm": 2}
FAVOURED = 4.0


def write_hellaswag(path: Path, items=ITEMS, context: str = CONTEXT) -> Path:
    """Items in the official format (rowanz/hellaswag's hellaswag_val.jsonl), every field present."""
    ctx_a, _, ctx_b = context.rpartition(". ")
    with open(path, "w") as f:
        for i, (endings, label) in enumerate(items):
            record = {"ind": i, "activity_label": "Roof shingle removal", "ctx_a": ctx_a + ".", "ctx_b": ctx_b.lower(), "ctx": context,
                      "split": "val", "split_type": "indomain", "label": label, "endings": endings, "source_id": f"activitynet~v_{i}"}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return path


def unigram_model() -> GPT:
    """A GPT whose every position predicts the same distribution: logits z with z[" yes"] = 4, 0 elsewhere, and
    a huge logit on the padded vocabulary rows, which are not tokens and must not count."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, tie_embeddings=False, position="learned"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.bias[0] = 1.0  # the hidden state is e_0 whatever the input (every block adds zero)
        model.lm_head.weight[tokenizer.encode(" yes")[0], 0] = FAVOURED
        model.lm_head.weight[tokenizer.gpt2_encoding().n_vocab :, 0] = 30.0
    return model.eval()


def expected_losses() -> tuple[float, float]:
    """(a, b): the loss of " yes" and of any other token under unigram_model, by hand."""
    n = tokenizer.gpt2_encoding().n_vocab
    log_z = math.log(n - 1 + math.exp(FAVOURED))
    return log_z - FAVOURED, log_z


def test_the_scores_are_the_known_answers(tmp_path):
    items = hellaswag.read_items(write_hellaswag(tmp_path / "hellaswag_val.jsonl"))
    model = unigram_model()
    summed, mean = hellaswag.ending_losses(model, items, 64, model.config.tokenizer_vocab_size, torch.device("cpu"))
    a, b = expected_losses()
    counts = [[(e.split().count("yes"), e.split().count("no")) for e in endings] for endings, _ in ITEMS]
    want_sum = torch.tensor([[y * a + n * b for y, n in row] for row in counts], dtype=torch.float64)
    want_mean = torch.tensor([[(y * a + n * b) / (y + n) for y, n in row] for row in counts], dtype=torch.float64)
    # fp32 logits and softmax over 50,257 ids, as the reproductions compute them: ~1e-5 relative
    torch.testing.assert_close(summed, want_sum, atol=0, rtol=1e-4)
    torch.testing.assert_close(mean, want_mean, atol=0, rtol=1e-4)
    for batch_items in (1, 2, 4):  # the batching (padding) changes nothing
        scores = hellaswag.score(model, items, 64, model.config.tokenizer_vocab_size, torch.device("cpu"), batch_items=batch_items)
        assert (scores.items, scores.correct, scores.correct_norm) == tuple(EXPECTED.values())
    shares = [hellaswag.score(model, items, 64, 50257, torch.device("cpu"), rank=r, world_size=2) for r in (0, 1)]
    assert [s.items for s in shares] == [2, 1] and sum(s.correct_norm for s in shares) == EXPECTED["correct_norm"]


def test_a_row_longer_than_the_block_loses_the_start_of_its_context(tmp_path):
    items = hellaswag.read_items(write_hellaswag(tmp_path / "long.jsonl", context=" ".join(["word"] * 200) + ". He"))
    model = unigram_model()  # block_size 64 < the context's ~200 tokens
    summed, _ = hellaswag.ending_losses(model, items, 64, 50257, torch.device("cpu"))
    a, b = expected_losses()
    assert summed[0, 0].item() == pytest.approx(3 * a, rel=1e-4)  # every ending token still scored


def random_model(position: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, position=position))
    with torch.no_grad():
        model.wte.weight.mul_(20)  # peakier than the init's near-uniform predictions: differences show
    return model.eval()


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_agrees_with_a_plain_reference_through_transformers_on_the_export(tmp_path, position):
    """Our scorer on our model == a straightforward loop through transformers on `export --hf` of it, with the
    export's own tokenizer: every ending's summed log-likelihood."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_gpt.interop.hf_dir import export_hf

    data = write_hellaswag(tmp_path / "hellaswag_val.jsonl", items=[(["runs down the ladder.", "eats the roof.", "sings", "is, again, sitting"], 2)] * 2)
    model = random_model(position)
    hf_dir = export_hf(model, tmp_path / "hf")
    hf, tok = AutoModelForCausalLM.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)
    reference = []
    for line in data.read_text().splitlines():
        example = json.loads(line)
        context = tok(example["ctx"])["input_ids"]
        row = []
        for ending in example["endings"]:
            cont = tok(" " + ending)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(hf(torch.tensor([context + cont])).logits[0].double(), dim=-1)
            row.append(-sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(cont)))
        reference.append(row)
    summed, _ = hellaswag.ending_losses(model, hellaswag.read_items(data), 64, 50257, torch.device("cpu"))
    torch.testing.assert_close(summed, torch.tensor(reference, dtype=torch.float64), atol=0, rtol=1e-4)


def test_evaluate_cli_on_an_export(tmp_path, capsys):
    from dist_gpt.interop.export_file import save_exported
    from dist_gpt.tools.evaluate import main

    save_exported(unigram_model(), tmp_path / "m.safetensors")
    data = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    result = main([str(tmp_path / "m.safetensors"), "--task", "hellaswag", "--data", str(data), "--device", "cpu"])
    assert result["hellaswag_items"] == 3 and result["hellaswag_acc"] == pytest.approx(1 / 3) and result["hellaswag_acc_norm"] == pytest.approx(2 / 3)
    assert "acc 33.33% | acc_norm 66.67%" in capsys.readouterr().out
    result = main([str(tmp_path / "m.safetensors"), "--data", str(data), "--limit", "2", "--device", "cpu"])
    assert result["hellaswag_items"] == 2 and result["hellaswag_acc_norm"] == 1.0
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "missing.jsonl")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "missing.jsonl does not exist")
    (tmp_path / "bad.jsonl").write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "bad.jsonl")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "bad.jsonl:1", "4 endings")


def test_downloaded_once_into_the_cache_and_a_clear_line_offline(tmp_path):
    (tmp_path / "site").mkdir()
    served = write_hellaswag(tmp_path / "site" / "hellaswag_val.jsonl")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hellaswag_{{split}}.jsonl"
    try:
        path = hellaswag.data_file(url=url, cache=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "cache" / "hellaswag_val.jsonl" and path.read_bytes() == served.read_bytes()
    assert hellaswag.data_file(url=url, cache=tmp_path / "cache") == path  # the server is gone: read from the cache
    assert sorted(p.name for p in path.parent.iterdir()) == ["hellaswag_val.jsonl"]  # no temporary file left

    with pytest.raises(UserError) as e:  # nothing listens there now
        hellaswag.data_file(url=url, cache=tmp_path / "empty")
    message = str(e.value)
    assert url.format(split="val") in message and str(tmp_path / "empty" / "hellaswag_val.jsonl") in message and "--data FILE" in message
    assert not (tmp_path / "empty" / "hellaswag_val.jsonl").exists()


def test_in_the_loop_2_ranks_score_as_1_rank(tiny_data, tmp_path):
    """train.eval_tasks=[hellaswag] through the real launcher: every rank scores its share, the counts summed,
    so 2 ranks log exactly what 1 rank logs; the records reach metrics.jsonl, plot and compare."""
    data = write_hellaswag(tmp_path / "hellaswag_val.jsonl", items=ITEMS + ITEMS[:2])  # 5 items: uneven shares
    tasks = ["train.eval_tasks=[hellaswag]", "train.eval_task_every=3", "train.eval_task_limit=4", f"train.eval_task_data={data}"]
    records = {}
    for world in (1, 2):
        overrides = tiny_overrides(tiny_data, tmp_path, f"w{world}", train__max_steps=6, train__global_batch_size=8, parallel__strategy="ddp" if world == 2 else "single")
        proc = run_python(["launch/train.py", f"--nproc_per_node={world}", "--config", "bible-tiny", *overrides, *tasks], timeout=240)
        assert "hellaswag acc" in proc.stdout
        records[world] = [r for r in read_jsonl(tmp_path / f"w{world}" / "metrics.jsonl") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in records[1]] == [3, 6]
    assert all(r["hellaswag_items"] == 4 for r in records[1])
    assert records[2] == records[1]  # the same global batch: the same steps, tokens and scores

    from dist_gpt.tools.compare import markdown_table
    from dist_gpt.tools.runs import read_runs

    runs = read_runs([str(tmp_path / "w1"), str(tmp_path / "w2")])
    assert [[p.step for p in run.tasks["hellaswag"]] for run in runs] == [[3, 6], [3, 6]]
    table = markdown_table(runs)
    assert "| hellaswag acc_norm |" in table and f"{100 * records[1][-1]['hellaswag_acc_norm']:.2f}% (6)" in table
    pytest.importorskip("matplotlib")
    from dist_gpt.tools.plot import plot_runs

    plot_runs(runs, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
