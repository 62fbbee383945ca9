"""`python -m dist_gpt.plan`: the planner's table, its JSON and its command line (the planning itself:
dist_gpt/autotune/plan.py)."""

from __future__ import annotations

import argparse
import json
import textwrap

from dist_gpt.autotune import memory
from dist_gpt.autotune.plan import GB, MB, Plan, Request, Row, plan
from dist_gpt.autotune.plan import __doc__ as PLAN_DOC
from dist_gpt.errors import UserError, cli

COLUMNS = ("params", "grads", "optim", "activ", "transient", "overhead", "total")


def memory_columns(b: memory.Breakdown) -> dict[str, int]:
    """transient: the loss layer's buffers and gathered FSDP/ZeRO-3 units at the peak; overhead: the CUDA
    context (or the CPU process and its heap slack)."""
    return dict(params=b.params, grads=b.gradients, optim=b.optimizer_states, activ=b.activations, transient=b.output_layer,
                overhead=b.overhead + b.allocator_slack, total=b.total)


def render(p: Plan) -> str:
    c, r = p.config.model, p.request
    unit = "GPU" if r.device == "cuda" else "CPU process"
    if r.gpus > 1:
        unit += "es" if unit.endswith("s") else "s"
    lines = [f"plan: {p.config.name}, {memory.param_count(c.gpt_config()) / 1e6:,.1f}M params ({c.n_layer} layers x {c.n_embd}, block "
             f"{c.block_size}), {p.dtype}, on {r.gpus} x {r.gpu_memory_gb:g} GB {unit}",
             p.batch_note,
             f"fits: predicted peak <= {p.limit / GB:.2f} GB ({r.gpu_memory_gb:g} GB less {p.config.train.memory_headroom:.0%} headroom, "
             "train.memory_headroom); MB per GPU at the row's micro-batch",
             f"{'option':<22}{'fits up to':>10}{'plan':>10}" + "".join(f"{h:>10}" for h in COLUMNS) + "  peak in"]
    for row in p.rows:
        if row.unavailable:
            lines.append(f"{row.option.label:<22}{'-':>10}{'-':>10}  n/a: {row.unavailable}")
            continue
        planned = f"{row.micro_batch} x {row.grad_accum}" if row.fits else "-"
        cols = memory_columns(row.memory)
        mark = "" if row.fits else f" (at micro-batch {row.memory.micro_batch})"
        lines.append(f"{row.option.label:<22}{row.largest or '-':>10}{planned:>10}" + "".join(f"{cols[h] / MB:>10,.0f}" for h in COLUMNS)
                     + f"  {row.memory.phase}{mark}")
    lines += ["plan: micro-batch x grad-accum keeping the global batch; +ckpt: activation checkpointing;",
              "transient: the loss layer's buffers and gathered shards at the peak; overhead: CUDA context (CPU: process + heap)"]
    if p.recommended:
        if p.alternatives:
            lines.append(f"without CPU offload it does not fit on {r.gpus} {unit}. What would:")
            lines += _alternatives(p)
        lines += [f"recommended: {p.recommended.option.label}, micro-batch {p.recommended.micro_batch} x grad-accum {p.recommended.grad_accum}",
                  *textwrap.wrap(p.why, 110, initial_indent="  why: ", subsequent_indent="       "), p.command]
    else:
        lines.append(f"it does not fit: no option fits micro-batch 1 in {p.limit / GB:.2f} GB each on {r.gpus} {unit}, not even "
                     f"with activation checkpointing{' and CPU offload' if r.allow_offload and r.device == 'cuda' else ''}. What would:")
        lines += _alternatives(p)
        first = next((cmd for _, cmd in p.alternatives if cmd), "")
        if first:
            lines += ["recommended (the first of these):", first]
    return "\n".join(lines)


def _alternatives(p: Plan) -> list[str]:
    return [f"  - {what}" + (f":\n      {cmd}" if cmd else "") for what, cmd in p.alternatives]


def to_json(p: Plan) -> dict:
    def row_json(row: Row) -> dict:
        o = row.option
        return {"option": o.name, "memory_strategy": o.memory_strategy, "offload": o.offload, "activation_checkpointing": o.checkpointing,
                "unavailable": row.unavailable, "largest_micro_batch": row.largest, "micro_batch": row.micro_batch,
                "grad_accum": row.grad_accum, "fits": row.fits,
                "memory_bytes": {"micro_batch": row.memory.micro_batch, "peak_in": row.memory.phase, **memory_columns(row.memory)}}

    r = p.request
    return {"config": p.config.name, "overrides": list(r.overrides), "gpus": r.gpus, "gpu_memory_gb": r.gpu_memory_gb, "device": r.device,
            "dtype": p.dtype, "limit_bytes": int(p.limit), "headroom": p.config.train.memory_headroom, "global_batch": p.batch,
            "global_batch_reachable": p.batch == p.config.train.global_batch_size, "global_batch_note": p.batch_note, "rows": [row_json(row) for row in p.rows],
            "recommended": {**row_json(p.recommended), "why": p.why, "command": p.command} if p.recommended else None,
            "what_would_fit": [{"what": w, "command": c} for w, c in p.alternatives]}  # nothing fit, or only with offload


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user mistake
        raise UserError(f"{message} (python -m dist_gpt.plan --help)")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m dist_gpt.plan", description=PLAN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2-124m-owt", help="a preset name (dist_gpt/configs) or a YAML file")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in all (default 1)")
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0, help="memory of one GPU in GiB (default 24)")
    parser.add_argument("--dtype", default="", help="bf16 | fp16 | fp32 (default: the config's; bf16 on GPU)")
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu: plan CPU processes of --gpu-memory-gb each")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for multi-node commands (default 8)")
    parser.add_argument("--no-offload", action="store_true", help="never plan CPU offload")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.preset=gpt2-xl model.block_size=512")
    args = parser.parse_args(argv)
    if args.dtype and args.dtype not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--dtype {args.dtype} is not one of bf16, fp16, fp32")
    request = Request(args.config, tuple(args.overrides), args.gpus, args.gpu_memory_gb, args.dtype, args.device, args.gpus_per_node, not args.no_offload)
    result = plan(request)
    print(json.dumps(to_json(result), indent=1) if args.json else render(result))


if __name__ == "__main__":
    main()
