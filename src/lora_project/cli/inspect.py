"""Adapter commands: `inspect` (adapters, weights, values, compare) and `merge`."""

from __future__ import annotations

from pathlib import Path

from lora_project.cli._common import add_config_args, add_json, add_number, add_overwrite, config_files, print_json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="look inside adapters: list, weights, values, compare",
                       description="Inspect adapters without training anything. Plots go to "
                                   "outputs/metrics/inspect/ unless --out is given.")
    isub = p.add_subparsers(dest="inspect_command", metavar="WHAT", required=True)
    q = isub.add_parser("adapters", help="table of every adapter (broken ones listed with the reason)")
    q.add_argument("--dir", type=Path, help="folder of adapters (default: adapters/)")
    q.add_argument("--sort", default="name", help="column to sort by (default: name), e.g. created, r, size_bytes")
    q.add_argument("--filter", default="", metavar="TEXT", help="keep rows whose name or dataset contains TEXT")
    add_json(q)
    q.set_defaults(handler=run_adapters)
    q = isub.add_parser("weights", help="per-module norms, relative update, ranks, spectra (+ heatmap PNG)",
                        description="Per layer and module: Frobenius norms of A, B and dW = scale * B @ A, "
                                    "||dW||/||W0||, spectral norm, stable rank, effective rank, top singular "
                                    "values (from the factors, never the full product); summaries by module "
                                    "type and layer; a heatmap and a spectra plot.")
    q.add_argument("adapter", type=Path, help="adapter folder")
    add_number(q, "--top-k", int, 1, 4096, default=8, help="singular values reported per module (default 8)")
    q.add_argument("--out", type=Path, help="folder for the PNG plots")
    add_json(q)
    q.set_defaults(handler=run_weights)
    q = isub.add_parser("values", help="slices, statistics, histograms and export of A, B and dW of modules")
    q.add_argument("adapter", type=Path, help="adapter folder")
    q.add_argument("--module", required=True, help="PEFT module path or glob, e.g. '*.layers.3.self_attn.q_proj'")
    add_number(q, "--rows", int, 1, 100_000, default=4, help="rows of each matrix to print (default 4)")
    add_number(q, "--cols", int, 1, 100_000, default=6, help="columns of each matrix to print (default 6)")
    q.add_argument("--export", choices=("npy", "csv"), help="also write A, B and dW of each module")
    q.add_argument("--out", type=Path, help="folder for the histogram PNG and exports")
    add_json(q, "print one JSON object (statistics only)")
    q.set_defaults(handler=run_values)
    q = isub.add_parser("compare", help="subspace similarity (LoRA paper eq. 4) and amplification of two adapters")
    q.add_argument("a", type=Path, help="first adapter folder")
    q.add_argument("b", type=Path, help="second adapter folder")
    add_number(q, "--max-rank", int, 1, 4096, help="compare only the top singular directions up to this rank")
    q.add_argument("--out", type=Path, help="folder for the PNG heatmaps")
    add_json(q)
    q.set_defaults(handler=run_compare)
    for q in isub.choices.values():
        add_config_args(q)

    p = sub.add_parser("merge", help="combine adapters into a new adapter, or export a merged full model",
                       description="Combine adapters with PEFT's add_weighted_adapter into adapters/<NAME>_lora "
                                   "(--name), and/or bake one adapter into a full transformers model folder "
                                   "(--export-model DIR) whose logits equal base + adapter.")
    p.add_argument("adapters", type=Path, nargs="+", help="adapter folders")
    p.add_argument("--name", help="name of the merged adapter (written to adapters/<NAME>_lora)")
    p.add_argument("--weights", help="comma-separated weight per adapter (default: 1/N each)")
    p.add_argument("--method", default="linear", help="linear | cat | ties | dare_linear | dare_ties (default linear)")
    add_number(p, "--density", float, 0.0, 1.0, lo_open=True, default=0.5,
               help="kept fraction for ties/dare methods (default 0.5)")
    p.add_argument("--export-model", type=Path, metavar="DIR", help="write base+adapter as a full model (one adapter)")
    add_overwrite(p)
    add_config_args(p)
    add_json(p)
    p.set_defaults(handler=run_merge)


def _out_root(args, paths) -> Path:
    return args.out or paths.metrics_dir / "inspect"


def run_adapters(args, paths) -> None:
    from lora_project.inspection.report import adapter_rows
    from lora_project.utils.tables import fmt_table

    rows = adapter_rows(args.dir or paths.adapters_dir, args.filter, args.sort)
    if args.json:
        print_json({"adapters": rows})
        return
    if not rows:
        print("no adapters found")
        return
    for r in rows:
        r["targets"] = ",".join(r.get("target_modules") or [])
        r["size_kb"] = r["size_bytes"] / 1024
    print(fmt_table(rows, [("name", "adapter", ""), ("status", "status", ""), ("dataset", "dataset", ""),
                           ("r", "r", ""), ("alpha", "alpha", ""), ("targets", "targets", ""),
                           ("trainable_parameters", "params", ""), ("size_kb", "KiB", ".0f"),
                           ("perplexity_after", "val ppl", ".2f"), ("created", "created", ""),
                           ("reason", "reason", "")]))


def run_weights(args, paths) -> None:
    from lora_project.inspection.report import weights_report
    from lora_project.utils.tables import fmt_table

    report = weights_report(args.adapter, _out_root(args, paths), args.top_k, config_files(args, paths),
                            args.overrides)
    if args.json:
        print_json(report)
        return
    print(fmt_table(report["modules"], [
        ("name", "module", ""), ("A_fro_norm", "|A|F", ".3f"), ("B_fro_norm", "|B|F", ".3f"),
        ("delta_fro_norm", "|dW|F", ".4f"), ("relative_update", "|dW|/|W0|", ".2e"),
        ("spectral_norm", "|dW|2", ".4f"), ("stable_rank", "stable r", ".2f"),
        ("effective_rank", "eff r", ".2f")]))
    for key in ("by_module", "by_layer"):
        print(f"\n{key.replace('_', ' ')}:")
        rows = [{"group": k, **v} for k, v in report[key].items()]
        print(fmt_table(rows, [("group", "group", ""), ("modules", "n", ""),
                               ("mean_delta_fro_norm", "mean |dW|F", ".4f"),
                               ("mean_relative_update", "mean |dW|/|W0|", ".2e"),
                               ("mean_effective_rank", "mean eff r", ".2f")]))
    print("\nplots: " + ", ".join(report["plots"]))


def run_values(args, paths) -> None:
    import numpy as np

    from lora_project.inspection.report import values_report

    report, arrays = values_report(args.adapter, args.module, _out_root(args, paths), args.export)
    if args.json:
        print_json(report)
        return
    for entry, (m, vals) in zip(report["modules"], arrays):
        print(f"== {m.name}  (scale {m.scale:g})")
        with np.printoptions(precision=4, suppress=False, linewidth=120):
            for k, v in vals.items():
                st = entry["stats"][k]
                print(f"{k} {tuple(v.shape)}: mean {st['mean']:.3e} std {st['std']:.3e} min {st['min']:.3e} "
                      f"max {st['max']:.3e} mean|x| {st['mean_abs']:.3e} near-zero {st['near_zero_fraction']:.1%}")
                print(v[:args.rows, :args.cols])
        print(f"histogram: {entry['histogram']}")


def run_compare(args, paths) -> None:
    from lora_project.inspection.report import compare_report
    from lora_project.utils.tables import fmt_table

    report = compare_report(args.a, args.b, _out_root(args, paths), args.max_rank, config_files(args, paths),
                            args.overrides)
    if args.json:
        print_json(report)
        return
    learned = report.get("mean_learned_phi_full") is not None
    init_cols = [("learned_phi_top1", "learned phi(1,1)", ".3f"), ("learned_phi_full", "learned phi(r,r)", ".3f"),
                 ("init_phi_a", "a~init", ".3f"), ("init_phi_b", "b~init", ".3f")] if learned else []
    print(fmt_table(report["modules"], [
        ("name", "module", ""), ("phi_top1", "phi(1,1)", ".3f"), ("phi_full", "phi(r,r)", ".3f"), *init_cols,
        ("amplification_a", f"ampl {report['a']}", ".2f"), ("amplification_b", f"ampl {report['b']}", ".2f")]))
    for r in report["modules"]:
        if r["undefined"]:
            r["phi_top1"] = r["phi_full"] = "undefined"
    if report["mean_phi_full"] is None:
        print(f"\nphi undefined: {report['modules'][0]['undefined']} (no directions to compare)")
    else:
        print(f"\nmean phi(1,1) {report['mean_phi_top1']:.3f}; mean phi(r,r) {report['mean_phi_full']:.3f} over "
              f"{len(report['modules']) - len(report['undefined_modules'])} modules with an update "
              f"(two random subspaces: ~{report['random_baseline_full']:.3f})")
    if learned:
        print(f"learned change (A - A_init): mean phi(1,1) {report['mean_learned_phi_top1']:.3f}, "
              f"phi(r,r) {report['mean_learned_phi_full']:.3f}; each against its own init: "
              f"{report['a']} {report['mean_init_phi_a']:.3f}, {report['b']} {report['mean_init_phi_b']:.3f} "
              f"(A moved {report['mean_A_change_a']:.1%} and {report['mean_A_change_b']:.1%} of its init norm)")
    else:
        why = report["init"]["a"]["reason"] or report["init"]["b"]["reason"]
        print(f"no init control: {why}")
    if report["init"]["shared"]:
        print(report["init"]["note"])
    print("plots: " + ", ".join(report["plots"]))


def run_merge(args, paths) -> None:
    from lora_project.models.merge import merge_or_export

    out = merge_or_export(paths, args.adapters, name=args.name, weights=args.weights, method=args.method,
                          density=args.density, export_model=args.export_model, overwrite=args.overwrite,
                          config_files=config_files(args, paths), overrides=args.overrides)
    if args.json:
        print_json(out)
    else:
        for k, v in out.items():
            print(f"wrote {k}: {v}")
