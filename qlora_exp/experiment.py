"""One experiment from a composed config: validate, seed, data, model, train, evaluate, save.

This module only wires the components together; each lives in its own module. It takes its run
directory and tracking identity as a `RunContext` argument, so a run works the same from
`qlora-train` (Hydra builds the context), a test or a notebook.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, Trainer, set_seed

from qlora_exp.baseline import BaselineCache, baseline_cache
from qlora_exp.data.module import DataModule
from qlora_exp.data.preference import build_data_module
from qlora_exp.data.preview import preview_data
from qlora_exp.errors import ExitCode, exit_code_for
from qlora_exp.generation import HeldOutSamples
from qlora_exp.guards import NonFiniteGuard, PreemptionCallback, QuantizedWeightGuard, oom_advice
from qlora_exp.model import build_quantized_model, count_trainable_parameters, load_tokenizer, save_adapter
from qlora_exp.run.context import RunContext
from qlora_exp.run.directory import DATA_STATS, METRICS, RunDirectory
from qlora_exp.run.distributed import quiet_non_main_ranks
from qlora_exp.run.finished import FinishedRun
from qlora_exp.run.init_from import starting_run
from qlora_exp.run.resume import prepare_resume
from qlora_exp.run.sweep import JobFailure, end_failed_job, finished_objective
from qlora_exp.schema import Config, to_schema
from qlora_exp.tracking import Tracker, TrackingCallback
from qlora_exp.training import (
    StartupTimer,
    build_evaluation_callbacks,
    build_trainer,
    build_training_arguments,
    check_peak_memory,
    job_start_time,
    train_and_evaluate,
)

log = logging.getLogger(__name__)

# A method's training and evaluation: its trainer and the checkpoint to resume from -> metrics.json's figures.
TrainFunction = Callable[[Trainer, Path | None], dict[str, Any]]


def run_experiment(cfg: DictConfig, run: RunContext) -> float:
    """One run in `run.path`; returns eval_loss, the sweepers' objective. Raises on failure, with
    the run directory marked FAILED and the reason."""
    started = job_start_time()
    schema = to_schema(cfg)  # every cross-field rule, before any data or weights load
    cfg, start = starting_run(cfg, schema)  # method.init_from's run, and the settings its adapter fixes
    schema = to_schema(cfg) if start else schema
    if schema.dry_run:  # data and tokenizer only, no weights, nothing trained
        return preview_data(schema)
    run_dir = run.path
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    quiet_non_main_ranks()
    if (objective := finished_objective(run, resolved)) is not None:  # sweep rerun: already done
        return objective
    with RunDirectory(run_dir) as run_directory:
        log.info("run directory: %s", run_dir)
        checkpoint = prepare_resume(run_dir, resolved, schema.resume, schema.resume_force)
        run_directory.write_resolved_config(resolved)
        run_directory.write_provenance()
        set_seed(schema.seed)
        tokenizer = load_tokenizer(schema.model)
        data = build_data_module(schema, tokenizer)
        data.setup()
        run_directory.write_json(DATA_STATS, data.stats.to_dict())
        run_directory.write_provenance(data_fingerprint=data.fingerprint)
        baseline = baseline_cache(schema, data.cache_key)
        trainer, train = method_trainer(schema, tokenizer, data, run_dir, start, baseline=baseline)
        model = cast(PeftModel, trainer.model)  # both methods train a LoRA adapter
        trainable = count_trainable_parameters(model)
        extra = {"trainable_params": trainable, "lora_scale": schema.lora.scale}
        with Tracker(schema.tracking, run, {**resolved, **extra}) as tracker:
            samples = HeldOutSamples(schema.eval, data, run_dir, tracker, baseline)
            startup = StartupTimer(started)
            for callback in (
                startup,
                TrackingCallback(tracker, perplexity=not schema.method.preference),
                samples,
                PreemptionCallback(),
                # After PreemptionCallback: its should_save is set by then, and a step that saves is
                # one where the guard reads its pending gradient norms back first.
                NonFiniteGuard(schema.trainer.nan_guard_patience),
                QuantizedWeightGuard(),  # after the samples: it checks after their generations
                *build_evaluation_callbacks(schema.trainer),
            ):
                trainer.add_callback(callback)
            metrics = {**train(trainer, checkpoint), **samples.metrics, **startup.metrics, **extra}
            check_peak_memory(schema.peak_memory_gb, metrics)
            if run_directory.writer:
                save_adapter(model, tokenizer, run_dir)
            run_directory.write_json(METRICS, metrics)
            tracker.summarize(metrics)
            tracker.log_adapter(schema, metrics)
        run_directory.mark_completed()
        log.info("COMPLETED: %s", run_dir)
    return float(metrics["eval_loss"])


def method_trainer(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    data: DataModule,
    run_dir: Path,
    start: FinishedRun | None,
    *,
    baseline: BaselineCache | None = None,
) -> tuple[Trainer, TrainFunction]:
    """The configured method's trainer, with its model, and the function that trains and evaluates it
    (metrics.json's figures): SFT's Trainer, or DPO's (qlora_exp/preference.py). `baseline`: where
    SFT's step-0 evaluation is shared by a sweep's jobs (qlora_exp/baseline.py)."""
    if cfg.method.preference:
        # Imported here, not at the top: TRL (and the W&B it imports) cost ~1.5 s per process that an
        # SFT run, e.g. each job process of a sweep, would otherwise pay for nothing.
        from qlora_exp.preference import build_preference_trainer, train_and_evaluate_preference  # noqa: PLC0415

        return build_preference_trainer(cfg, tokenizer, data, run_dir, start), train_and_evaluate_preference
    model = build_quantized_model(cfg.model, cfg.lora)
    arguments = build_training_arguments(cfg.trainer, run_dir, cfg.seed)
    return build_trainer(model, tokenizer, data, arguments, baseline), train_and_evaluate


def run_job(cfg: DictConfig, run: RunContext) -> float | JobFailure:
    """`run_experiment` with failures turned into documented exit codes (README, "Exit codes"):
    a single run raises SystemExit(code); a sweep job returns a JobFailure so the others still run."""
    try:
        return run_experiment(cfg, run)
    except Exception as exc:  # the run directory is already marked FAILED with the reason
        code = exit_code_for(exc)
        if code == ExitCode.OUT_OF_MEMORY:
            log.error("%s", oom_advice(cfg))
        elif code == ExitCode.OTHER:
            log.exception("unexpected error")
        else:
            log.error("%s", exc)
        return end_failed_job(code, exc, run)
    finally:
        # The run's model and trainer are unreachable now; free them (they hold reference cycles) and
        # their GPU memory before a sweep's next job freezes what is alive (`cli.imports_done`). Once
        # the imports are frozen, the collection walks only the job's own objects: the imports alone
        # cost 0.41 CPU-s to walk unfrozen, ~0 frozen.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
