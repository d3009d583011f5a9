"""The `scaling` command line: thin argparse front-ends over library functions (no logic lives here).

    scaling estimate-memory --preset large --zero 3 --gpus 8 --precision bf16 --batch 8
    scaling convert biomedgpt_base.pt out/biomedgpt-base --bpe-dir ofa_bpe
    scaling export runs/instruct
    scaling infer --checkpoint runs/instruct/export --image scan.jpg --question "is there a lesion?"
    scaling report runs/base/report.json runs/large/report.json --out compare/
    scaling data inspect vqa_rad --path data/vqa_rad
    scaling env
"""

from __future__ import annotations

import argparse
import pickle
import sys

from scaling.environment import require_supported_versions


def _add_estimate_memory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate-memory", help="per-GPU memory of a preset under a ZeRO stage, precision and PEFT")
    p.add_argument("--config", help="a recipe config: preset, micro-batch, image size, lengths, precision, "
                                    "checkpointing, PEFT, EMA and frozen embeddings come from it (--batch overrides)")
    p.add_argument("--preset", default="base", help="model size preset (test, mini, tiny, medium, base, large, xlarge)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (0: DDP)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs the states are partitioned over")
    p.add_argument("--offload", default="none", choices=("none", "cpu"),
                   help="ZeRO-Offload: optimizer states (and stage-3 weights) in CPU memory")
    p.add_argument("--peft", default="none", choices=("none", "lora", "dora", "ia3", "prefix", "ptv2", "qlora"),
                   help="PEFT method on every component it applies to (none = full fine-tuning)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch", type=int, help="micro-batch per GPU (default 8, or the config's)")
    p.add_argument("--image-size", type=int, help="input resolution (default: the preset's)")
    p.add_argument("--src-len", type=int, default=128, help="encoder text tokens")
    p.add_argument("--tgt-len", type=int, default=32, help="decoder tokens (the prompt too under prev_output)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="total with gradient checkpointing")
    p.add_argument("--ema", action="store_true", help="an fp32 EMA of the trainable weights on every GPU")
    p.add_argument("--freeze-embeddings", action="store_true", help="the token embedding does not train")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="whose attention kernel the activations follow (cpu: the 2-rank CPU runs)")
    p.add_argument("--gpu-memory", help="GPU size for the verdict, e.g. 80GB")
    p.add_argument("--fit", metavar="SIZE", help="list the configurations (ZeRO x offload x PEFT x checkpointing x "
                                                 "batch) that fit a GPU of this size, e.g. 80GB")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_estimate_memory)


def _run_estimate_memory(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from scaling.config import load_config
    from scaling.training.memory_estimate import (
        estimate_for_config,
        estimate_memory,
        estimate_table,
        fit,
        fit_table,
        parse_size,
    )

    try:
        if args.fit:
            limit = parse_size(args.fit)
            found = fit(limit, args.preset, args.gpus, args.precision, args.image_size, args.src_len, args.tgt_len,
                        ema=args.ema, freeze_embeddings=args.freeze_embeddings)
            if args.json:
                print(json.dumps([e.as_dict() for e in found], indent=2))
            else:
                Console().print(fit_table(found, limit))
            return 0 if found else 1
        if args.config:
            est = estimate_for_config(load_config(args.config), args.zero, args.gpus, args.offload, args.device,
                                      args.batch)
        else:
            est = estimate_memory(args.preset, args.zero, args.gpus, args.offload, args.peft, args.precision,
                                  args.batch or 8, args.image_size, args.src_len, args.tgt_len,
                                  args.gradient_checkpointing, args.device, args.ema, args.freeze_embeddings)
        gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:  # ConfigError included
        print(f"scaling estimate-memory: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**est.as_dict(), "fits": est.fits(gpu_memory) if gpu_memory else None}, indent=2))
    else:
        Console().print(estimate_table(est, gpu_memory))
    return 0 if gpu_memory is None or est.fits(gpu_memory) else 1


CONVERT_READS = """\
what is read from the checkpoint:
  tensor shapes   vocabulary, width, layers, heads, FFN sizes, ResNet stages and stem width, max_positions (both
                  position tables), token/image bucket sizes, NormFormer (c_attn)
  index buffers   token_rp_bucket (side = range of the token buckets: 1024 in OFA whatever max_source_positions),
                  image_rp_bucket, image_position_idx (length = code grid + 769 or 768 pads: code_image_size);
                  checked against the model's own indices, then dropped
  fairseq .pt     cfg.model (or args): encoder_embed_dim decoder_embed_dim encoder_layers decoder_layers
                  encoder_attention_heads decoder_attention_heads encoder_ffn_embed_dim decoder_ffn_embed_dim
                  max_source_positions max_target_positions token_bucket_size image_bucket_size attn_scale_factor
                  code_image_size resnet_type activation_fn scale_attn scale_fc scale_heads dropout attention_dropout
                  activation_dropout encoder_drop_path_rate decoder_drop_path_rate resnet_drop_path_rate;
                  cfg.task (or args): patch_image_size (-> image_size), code_dict_size and num_bins (checked against
                  the tokenizer); --weights ema: extra_state.ema, with extra_state.ema_fp32_params on top
  config.json     beside HF-port weights (OFAConfig): vocab_size d_model encoder_layers decoder_layers
                  encoder_attention_heads decoder_attention_heads encoder_ffn_dim decoder_ffn_dim
                  max_position_embeddings token_bucket_size image_bucket_size attn_scale_factor code_image_size
                  normformer resnet_type activation_function dropout attention_dropout activation_dropout
                  encoder_drop_path_rate decoder_drop_path_rate resnet_drop_path_rate init_std
A field both in the config and in the tensors must agree. Refused, naming the field, because the model does not
compute them: encoder_normalize_before/decoder_normalize_before false (post-LN), no_scale_embedding false or
scale_embedding true, layernorm_embedding/patch_layernorm_embedding/code_layernorm_embedding/add_type_embedding
false, entangle_position_embedding true, disable_entangle false (fairseq), share_all_embeddings or
share_decoder_input_output_embed false, scale_resids, adapter, encoder_prompt, decoder_prompt or
interpolate_position true, mixed scale_attn/scale_fc/scale_heads, max_target_positions != max_source_positions.
Nothing is written until the saved model reloads with identical tensors and logits."""


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a fairseq or OFA-HF BiomedGPT checkpoint into a save_pretrained dir",
                       epilog=CONVERT_READS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="fairseq .pt, HF-port pytorch_model.bin / .safetensors, or an HF-port model directory")
    p.add_argument("out_dir", help="output directory (weights, config, tokenizer, conversion.json)")
    p.add_argument("--bpe-dir", help="tokenizer files (encoder.json+vocab.bpe+dict.txt, or vocab.json+merges.txt); "
                                     "default: the checkpoint's own directory")
    p.add_argument("--preset", help="expected size preset; default: inferred from the tensor shapes")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="fairseq weights to convert: the trained model or its EMA copy (--store-ema)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="DANGEROUS: unpickle without the safe allowlist; the file can run code. Trusted files only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from scaling.models.biomedgpt.convert import ConversionError, convert_checkpoint
    from scaling.safe_load import CheckpointLoadError

    try:
        report = convert_checkpoint(args.source, args.out_dir, bpe_dir=args.bpe_dir, preset=args.preset,
                                    weights=args.weights, trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    except (ConversionError, CheckpointLoadError, FileExistsError, FileNotFoundError) as error:
        print(f"scaling convert: {error}", file=sys.stderr)
        return 1
    print(f"converted {report.source} ({report.source_format}, preset {report.preset or 'custom'}) -> {args.out_dir}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a run's checkpoint (any ZeRO stage, PEFT merge) into a model dir")
    p.add_argument("run_dir", help="the run directory (train.output_dir) holding checkpoints/ and config.yaml")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest complete one)")
    p.add_argument("--merge", action="store_true", help="PEFT runs: also write the model with adapters merged in")
    p.add_argument("--trust-pickle", action="store_true",
                   help="DANGEROUS: unpickle ZeRO shards without the safe allowlist; they can run code. Trusted runs only")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from scaling.config import ConfigError
    from scaling.safe_load import CheckpointLoadError
    from scaling.training.checkpoint import CheckpointError, export_checkpoint

    try:
        out = export_checkpoint(args.run_dir, args.out, args.checkpoint, args.merge, args.trust_pickle)
    except (CheckpointError, CheckpointLoadError, ConfigError, pickle.UnpicklingError, OSError) as err:
        print(f"scaling export: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="answer one question about one image (or a text-only task) with a checkpoint")
    p.add_argument("--checkpoint", required=True, help="model directory, run directory (its export/) or PEFT adapter")
    p.add_argument("--base-checkpoint", help="base model directory when --checkpoint is an adapter")
    p.add_argument("--task", default="vqa", choices=("vqa", "caption", "classify", "nli", "summarize", "qa"))
    p.add_argument("--image", help="image file (vqa, caption, classify)")
    p.add_argument("--question", help="question (vqa, qa)")
    p.add_argument("--text1", help="premise (nli)")
    p.add_argument("--text2", help="hypothesis (nli)")
    p.add_argument("--text", help="article to summarize (summarize)")
    p.add_argument("--context", help="passage the question is about (qa)")
    p.add_argument("--candidates", help="comma-separated answers to constrain or score over (vqa, classify)")
    p.add_argument("--mode", choices=("auto", "generate", "constrained", "score"),
                   help="default: the export's eval.mode (inference.json), else auto (the task's BiomedGPT decoding)")
    p.add_argument("--beam", type=int, help="beam size of an explicit mode (default: the export's)")
    p.add_argument("--max-new-tokens", type=int, help="answer tokens before EOS of an explicit mode (default: the "
                                                       "export's)")
    p.add_argument("--prompt-type", choices=("none", "prev_output"),
                   help="decoder prompt layout (default: the one the export was trained with, else prev_output)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (prompt, settings, candidate scores)")
    p.set_defaults(func=_run_infer)


def _run_infer(args: argparse.Namespace) -> int:
    import json

    from scaling.evaluation.checkpoints import CheckpointNotFound
    from scaling.evaluation.infer import infer

    fields = {"question": args.question, "sentence1": args.text1, "sentence2": args.text2, "source": args.text,
              "context": args.context}
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else None
    decoding = {"mode": args.mode, "beam": args.beam, "max_new_tokens": args.max_new_tokens}
    try:
        result = infer(args.checkpoint, args.task, {k: v for k, v in fields.items() if v}, args.image, candidates,
                       decoding, args.base_checkpoint, args.prompt_type)
    except (CheckpointNotFound, OSError, ValueError, pickle.UnpicklingError) as error:
        print(f"scaling infer: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else result["prediction"])
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="merge several report.json files into one comparison report")
    p.add_argument("reports", nargs="+", help="report.json files or the directories holding them")
    p.add_argument("--out", required=True, help="directory for the merged report.json / report.md / report.html")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from scaling.evaluation.report import merge_reports

    try:
        merged = merge_reports(args.reports, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"scaling report: {error}", file=sys.stderr)
        return 1
    print(f"merged {len(merged['evaluations'])} evaluations from {len(args.reports)} reports -> "
          f"{args.out}/report.html")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect a dataset in its native format, or convert it to TSV / instructions")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", help="native format: vqa_rad, slake, pathvqa, caption_tsv, iu_xray_r2gen, medmnist, "
                                       "image_folder, mednli, meqsum, pubmedqa, biomedgpt_tsv, llava_med")
    common.add_argument("--path", required=True, help="the dataset folder (or file) as released")
    common.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="source option, e.g. q_lang=zh, task=vqa, flag=pathmnist (repeatable)")
    common.add_argument("--on-bad-record", choices=("skip", "error"), default="skip",
                        help="skip and count unusable records, or stop at the first with its file, index and fix")
    common.add_argument("--verify-images", action="store_true", help="decode every image once while loading")
    inspect = actions.add_parser("inspect", parents=[common], help="split sizes, counts and formatted samples")
    inspect.add_argument("--split", action="append", help="split(s) to show (default: all)")
    inspect.add_argument("--samples", type=int, default=3, help="formatted samples per split")
    inspect.set_defaults(func=_run_data_inspect)
    convert = actions.add_parser("convert", parents=[common], help="write a split as BiomedGPT TSV or instructions")
    convert.add_argument("--split", default="train", help="split to convert (default: train)")
    convert.add_argument("--to", choices=("tsv", "instruct"), required=True, help="output format")
    convert.add_argument("--out", required=True, help="output file (.tsv, or .json for instruct)")
    convert.add_argument("--seed", type=int, default=0, help="instruction template/option sampling seed")
    convert.set_defaults(func=_run_data_convert)


def _data_options(args: argparse.Namespace) -> dict:
    from scaling.data.sources.summary import parse_options

    return {**parse_options(args.option), "on_bad_record": args.on_bad_record, "verify_images": args.verify_images}


def _run_data_inspect(args: argparse.Namespace) -> int:
    from scaling.data.images import ImageError
    from scaling.data.records import DataError
    from scaling.data.sources.summary import inspect_source, render_summaries

    try:
        summaries = inspect_source(args.source, args.path, args.split, args.samples, **_data_options(args))
    except (DataError, ImageError) as error:
        print(f"scaling data inspect: {error}", file=sys.stderr)
        return 2
    render_summaries(args.source, summaries)
    return 0


def _run_data_convert(args: argparse.Namespace) -> int:
    from scaling.data.images import ImageError
    from scaling.data.records import DataError
    from scaling.data.sources.summary import convert_source

    try:
        written = convert_source(args.source, args.path, args.split, args.to, args.out, args.seed,
                                 **_data_options(args))
    except (DataError, ImageError) as error:
        print(f"scaling data convert: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written['rows']:,} records to {written['file']} (skipped: {written['skipped'] or 'none'}); "
          f"read back with source {written['reload']['source']!r}")
    return 0


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="the installed stack, the lock and the accelerate config, for bug reports")
    p.set_defaults(func=_run_env)


def _run_env(args: argparse.Namespace) -> int:
    from scaling.environment import environment_report

    print(environment_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_estimate_memory, _add_convert, _add_export, _add_infer, _add_report, _add_data, _add_env):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "env":  # `env` is what to run when the versions are wrong
        require_supported_versions()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
