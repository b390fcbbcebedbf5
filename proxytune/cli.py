"""The ``proxytune`` command line: generate, demo, experiment, router."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("proxytune")


def _add_generate(commands) -> None:
    parser = commands.add_parser(
        "generate", help="proxy-tuned generation from local model folders",
        description="Steer a frozen base with expert / anti-expert pairs and stream the text.",
    )
    parser.add_argument("prompt", nargs="+", help="one or more prompts, generated in turn")
    parser.add_argument("--base", required=True, help="folder of the base model (safetensors)")
    parser.add_argument("--expert", help="folder of the tuned expert")
    parser.add_argument("--anti-expert", help="folder of the untuned anti-expert")
    parser.add_argument("--alpha", type=float, default=1.0, help="steering strength")
    parser.add_argument(
        "--pair", action="append", default=[], metavar="NAME=EXPERT_DIR,ANTI_DIR",
        help="a named pair, repeatable (routers choose among these names)",
    )
    parser.add_argument("--router", help="folder of a fitted router: route each prompt")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the base tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 decodes greedily, above 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(run=_run_generate)


def _parse_pair(text: str) -> tuple[str, str, str]:
    name, _, folders = text.partition("=")
    expert_dir, _, anti_dir = folders.partition(",")
    if not name or not expert_dir or not anti_dir:
        raise SystemExit(f"--pair wants NAME=EXPERT_DIR,ANTI_DIR, got {text!r}.")
    return name, expert_dir, anti_dir


def _load_model(args):
    from proxytune import ExpertPair, ProxyTunedModel
    from proxytune.loading import load_local

    base, tokenizer = load_local(args.base)
    if tokenizer is None:
        raise SystemExit(f"{args.base} holds no tokenizer; the base's folder must have one.")
    model = ProxyTunedModel(base, tokenizer=tokenizer)

    pair_specs = [_parse_pair(text) for text in args.pair]
    if args.expert or args.anti_expert:
        if not (args.expert and args.anti_expert):
            raise SystemExit("Give --expert and --anti-expert together.")
        pair_specs.insert(0, ("expert", args.expert, args.anti_expert))
    for name, expert_dir, anti_dir in pair_specs:
        expert, expert_tokenizer = load_local(expert_dir)
        anti, anti_tokenizer = load_local(anti_dir)
        model.add_pair(ExpertPair(name, expert, anti, alpha=args.alpha),
                       tokenizer=expert_tokenizer or anti_tokenizer)
    return model


def _run_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    model = _load_model(args)
    tokenizer = model.tokenizer
    router = None
    if args.router:
        from proxytune.routing import load
        from proxytune.routing.signals import model_name_of

        expected = {"model_name": model_name_of(model.base),
                    "dim": model.base.config.hidden_size}
        router = load(args.router, expected_signal=expected, device=model.base.device)
    elif not model.pairs:
        logger.info("No expert given: generating with the base alone.")

    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id

    for prompt in args.prompt:
        text = prompt
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        encoded = tokenizer(text, return_tensors="pt")
        steering = dict(router=router, prompts=[prompt]) if router else dict(
            expert=next(iter(model.pairs), None))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        print(f"### {prompt}", flush=True)
        with torch.no_grad():
            model.generate(
                encoded["input_ids"], attention_mask=encoded["attention_mask"],
                max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature or None, top_p=args.top_p,
                seed=args.seed, streamer=streamer, pad_token_id=pad_token_id, **steering,
            )
    return 0


def _add_demo(commands) -> None:
    parser = commands.add_parser("demo", help="the embedded family, side by side")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from proxytune.demo import run_demo

    run_demo(sys.stdout)
    return 0


def _add_experiment(commands) -> None:
    parser = commands.add_parser("experiment", help="alignment experiments")
    parser.add_argument("name", choices=["alignment"])
    parser.add_argument("--out", default="results/alignment", help="folder for the results")
    parser.add_argument("--prompts", type=int, default=None,
                        help="test prompts per domain (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=None,
                        help="steering strength of every pair (default: the family's)")
    parser.set_defaults(run=_run_experiment)


def _run_experiment(args) -> int:
    from proxytune.experiments.alignment import run_alignment

    table = run_alignment(args.out, n_prompts=args.prompts, seed=args.seed, alpha=args.alpha)
    print(table)
    return 0


def _add_router(commands) -> None:
    parser = commands.add_parser("router", help="fit routers")
    router_commands = parser.add_subparsers(dest="router_command", required=True)
    fit = router_commands.add_parser("fit", help="fit a router from calibration JSONL")
    fit.add_argument("--signal", required=True,
                     help="'base', 'base:LAYER[:POOLING]' (the base's pooled hidden "
                          "states; needs --base), 'minilm' or a sentence-embedding folder")
    fit.add_argument("--base", help="folder of the base model, for a 'base' signal")
    fit.add_argument("--data", required=True, help="JSONL with prompt and expert or scores")
    fit.add_argument("--out", required=True, help="folder to save the router to")
    fit.add_argument("--kind", choices=["cluster", "difficulty"], default="cluster")
    fit.add_argument("--clusters", type=int, default=8)
    fit.add_argument("--steer-share", type=float, default=0.5,
                     help="difficulty router: share of prompts to steer")
    fit.add_argument("--cost-weight", type=float, default=0.0)
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(run=_run_router_fit)


def _run_router_fit(args) -> int:
    from proxytune.routing import fit_router_from_jsonl, make_signal

    base_model = tokenizer = None
    if args.base:
        from proxytune.loading import load_local

        base_model, tokenizer = load_local(args.base)
    signal = make_signal(args.signal, base_model=base_model)
    router = fit_router_from_jsonl(
        args.data, signal, args.out, kind=args.kind, base_model=base_model,
        tokenizer=tokenizer, n_clusters=args.clusters, cost_weight=args.cost_weight,
        target_share=args.steer_share, seed=args.seed,
    )
    print(f"saved a {router.kind} router over {router.pair_names} to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proxytune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_demo(commands)
    _add_experiment(commands)
    _add_router(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"proxytune: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
