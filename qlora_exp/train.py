"""qlora-train: compose and validate the config, then seed, data, model, train, evaluate, save.

This module only wires the components together; each lives in its own module.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from qlora_exp.data import DataModule
from qlora_exp.distributed import quiet_non_main_ranks, run_stamp
from qlora_exp.errors import ExitCode, OutOfMemoryError, QloraError
from qlora_exp.generation import HeldOutSamples
from qlora_exp.guards import NonFiniteGuard, PreemptionCallback, QuantizedWeightGuard, oom_advice
from qlora_exp.model import build_quantized_model, count_trainable_parameters, load_tokenizer, save_adapter
from qlora_exp.preview import preview_data
from qlora_exp.resume import prepare_resume, register_resolvers
from qlora_exp.run_dir import RunDirectory
from qlora_exp.schema import register_configs, to_schema
from qlora_exp.sweep import JobFailure, end_failed_job, finished_objective, register_sweep_configs
from qlora_exp.tracking import Tracker, TrackingCallback
from qlora_exp.training import (
    build_evaluation_callbacks,
    build_trainer,
    build_training_arguments,
    train_and_evaluate,
)

log = logging.getLogger("qlora_exp.train")
register_sweep_configs()
register_configs()
OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
register_resolvers()
# conf/ sits beside the package in the source tree (installed editable by `make install`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def run_experiment(cfg: DictConfig) -> float:
    """One run in the Hydra run directory; returns eval_loss, the sweepers' objective."""
    schema = to_schema(cfg)  # every cross-field rule, before any data or weights load
    if schema.dry_run:  # data and tokenizer only, no weights, nothing trained
        return preview_data(schema)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    quiet_non_main_ranks()
    if (objective := finished_objective(run_dir, resolved)) is not None:  # sweep rerun: already done
        return objective
    with RunDirectory(run_dir) as run:
        log.info("run directory: %s", run_dir)
        checkpoint = prepare_resume(run_dir, resolved, schema.resume, schema.resume_force)
        run.write_resolved_config(resolved)
        run.write_provenance()
        set_seed(schema.seed)
        tokenizer = load_tokenizer(schema.model)
        data = DataModule(schema.data, tokenizer, schema.seed, schema.trainer.per_device_train_batch_size)
        data.setup()
        run.write_json("data_stats.json", data.stats.to_dict())
        run.write_provenance(data_fingerprint=data.fingerprint)
        model = build_quantized_model(schema.model, schema.lora)
        trainable = count_trainable_parameters(model)
        extra = {"trainable_params": trainable, "lora_scale": schema.lora.scale}
        with Tracker(schema.tracking, run_dir, {**resolved, **extra}) as tracker:
            args = build_training_arguments(schema.trainer, run_dir, schema.seed)
            samples = HeldOutSamples(schema.eval, data, run_dir, tracker)
            guards = [
                NonFiniteGuard(schema.trainer.nan_guard_patience),
                PreemptionCallback(),
                QuantizedWeightGuard(),
            ]
            callbacks = [
                TrackingCallback(tracker),
                samples,
                *guards,
                *build_evaluation_callbacks(schema.trainer),
            ]
            trainer = build_trainer(model, tokenizer, data, args, callbacks)
            metrics = {**train_and_evaluate(trainer, checkpoint), **samples.metrics, **extra}
            if run.writer:
                save_adapter(model, tokenizer, run_dir)
            run.write_json("metrics.json", metrics)
            tracker.summarize(metrics)
        del trainer, model
        gc.collect()
        run.mark_completed()
        log.info("COMPLETED: %s", run_dir)
    return float(metrics["eval_loss"])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | JobFailure:
    """Console entry point; failures become documented exit codes (README, "Exit codes"),
    or, inside a sweep, a JobFailure so that the other jobs still run."""
    try:
        return run_experiment(cfg)
    except QloraError as exc:
        log.error("%s", exc)
        return end_failed_job(exc.exit_code, exc)
    except torch.OutOfMemoryError as exc:
        log.error("%s", oom_advice(cfg))
        return end_failed_job(OutOfMemoryError.exit_code, exc)
    except Exception as exc:  # unexpected: already marked FAILED above; ends as exit code OTHER
        log.exception("unexpected error")
        return end_failed_job(ExitCode.OTHER, exc)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
