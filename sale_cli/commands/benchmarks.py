"""The `sale longbench` and `sale infinitebench` commands: official prompts and scoring, data-parallel ranks."""

from __future__ import annotations

import os
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sale_cli.commands.common import PREFILL_CHUNK_HELP, error_exit, parse_names
from sale_cli.errors import UserError
from sale_cli.eval.common import (
    Benchmark,
    barrier,
    check_run_config,
    experiment_dir,
    finish_ranks,
    rank_world,
    run_lock,
)


class Method(str, Enum):
    dense = "dense"
    sale = "sale"


class TemplateSet(str, Enum):
    yarn_mistral = "yarn_mistral"
    gpt4 = "gpt4"


class Scorer(str, Enum):
    official = "official"
    minference = "minference"


ModelArg = Annotated[str, typer.Argument(help="Model: alias (smollm2-135m), HF id, local folder or .gguf file.")]
ExpOpt = Annotated[str, typer.Option("--exp", help="Experiment name: results go to RESULTS_DIR/EXP/.")]
MethodOpt = Annotated[Method, typer.Option(help="Prefill attention: exact dense, or SALE sparse.")]
ThresholdsOpt = Annotated[Path | None, typer.Option(
    help="SALE thresholds .safetensors file (with --method sale).", exists=True, dir_okay=False)]
ThetaOpt = Annotated[float | None, typer.Option(
    help="Use the calibrated thresholds: file theta_<THETA>.safetensors in the model's folder under "
         "RESULTS_DIR/calibration/ (with --method sale).")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Only the first N samples of each dataset/task.")]
ResultsOpt = Annotated[Path, typer.Option(help="Folder of all results.")]
MaxLengthOpt = Annotated[int | None, typer.Option(
    min=2, help="Token limit of prompt plus generation; longer prompts are cut in the middle. "
                "Default: the model's context length.")]
EvalOnlyOpt = Annotated[bool, typer.Option("--eval-only", help="Only rescore the predictions and write result.json.")]
DtypeOpt = Annotated[str, typer.Option(help="Model dtype: auto, bfloat16, float16 or float32.")]
DeviceOpt = Annotated[str, typer.Option(help="Device: auto, cpu, cuda, cuda:N (set per rank under torchrun).")]
DeviceMapOpt = Annotated[str | None, typer.Option(
    help="Spread one model over the GPUs (e.g. 'auto'); not with several torchrun ranks.")]
PrefillChunkOpt = Annotated[int | None, typer.Option(help=PREFILL_CHUNK_HELP)]


def _evaluate(bench: Benchmark, names: list[str] | None, exp_dir: Path, eval_only: bool, generate) -> None:
    """Generate (unless eval-only) on every rank; then rank 0 merges the rank files, scores and shows the result.

    `names` limits the scoring (None: everything with predictions)."""
    bench_dir = exp_dir / bench.name
    try:
        # one run per experiment and benchmark at a time (rescoring a missing folder needs no lock)
        with run_lock(bench_dir) if not eval_only or bench_dir.is_dir() else nullcontext():
            if not eval_only:
                generate()
                barrier()
            if rank_world()[0] == 0:
                bench.consolidate(exp_dir)
                _score_and_show(bench, exp_dir, names, eval_only)
    finally:
        finish_ranks()


def _score_and_show(bench: Benchmark, exp_dir: Path, names: list[str] | None, eval_only: bool) -> None:
    try:
        result = bench.score(exp_dir, names)
    except ModuleNotFoundError as err:
        if eval_only:
            raise
        typer.echo(f"predictions are in {exp_dir / bench.name}; scoring needs {err.name} "
                   "(pip install 'sale[eval]'), then rerun with --eval-only")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{bench.name}: {exp_dir.name}")
    table.add_column(bench.option.lstrip("-").rstrip("s"))
    table.add_column("score", justify="right")
    for name, value in result.items():
        table.add_row(name, f"{value:.2f}")
    Console().print(table)
    typer.echo(f"wrote {exp_dir / bench.name / 'result.json'}")


def _load_runner(model: str, method: Method, thresholds: Path | None, theta: float | None, results_dir: Path,
                 dtype: str, device: str, device_map: str | None, prefill_chunk: int | None = None):
    if thresholds is not None and theta is not None:
        raise typer.BadParameter("give --thresholds or --theta, not both", param_hint="--thresholds/--theta")
    if method is Method.dense and (thresholds is not None or theta is not None):
        raise typer.BadParameter("thresholds need --method sale", param_hint="--method")
    rank, world = rank_world()
    if world > 1:
        if device_map is not None:
            raise typer.BadParameter("one model over several GPUs cannot be combined with torchrun ranks",
                                     param_hint="--device-map")
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    from sale_cli.eval.common import offline_unless_reachable
    from sale_cli.runner import load_runner

    offline_unless_reachable(model)  # an unreachable hub: load from the cache or fail at once, no retries
    return load_runner(model=model, method=method.value, thresholds=str(thresholds) if thresholds else None,
                       theta=theta, results_dir=str(results_dir), dtype=dtype, device=device,
                       device_map=device_map, prefill_chunk=prefill_chunk)


def _check_prefill_chunk(prefill_chunk: int | None) -> None:
    """A bad --prefill-chunk fails before the data is fetched or the model loaded."""
    if prefill_chunk is not None:
        from sale_cli.runner import check_prefill_chunk

        check_prefill_chunk(prefill_chunk)


def _run_config(runner, method: Method, thresholds: Path | None, theta: float | None, max_length: int | None,
                **extra) -> dict:
    return {"model": runner.model_name, "method": method.value,
            "thresholds": str(thresholds.resolve()) if thresholds else None, "theta": theta,
            "max_length": max_length, **extra}


def longbench(
    model: ModelArg = "smollm2-135m",
    exp: ExpOpt = ...,
    datasets: Annotated[list[str] | None, typer.Option(
        help="Datasets, repeated or comma-separated; 'all' for all 21. Default: the 14 of the SALE paper "
             "(with --eval-only: every dataset with predictions).")] = None,
    method: MethodOpt = Method.dense,
    thresholds: ThresholdsOpt = None,
    theta: ThetaOpt = None,
    limit: LimitOpt = None,
    results_dir: ResultsOpt = Path("results"),
    data_dir: Annotated[Path, typer.Option(help="Folder of the official LongBench <dataset>.jsonl files.")] = Path(
        "data/longbench"),
    max_length: MaxLengthOpt = None,
    eval_only: EvalOnlyOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    prefill_chunk: PrefillChunkOpt = None,
) -> None:
    """Run LongBench v1 with official prompts and scoring; resumable, data-parallel under torchrun."""
    from sale_cli.eval import longbench as lb

    try:
        names = parse_names(datasets, lb.ALL_DATASETS, lb.PAPER_DATASETS, "--datasets")
        _check_prefill_chunk(prefill_chunk)
        exp_dir = experiment_dir(results_dir, exp)

        def generate() -> None:
            lb.check_data(names, data_dir)  # before the model: a missing file fails in seconds
            runner = _load_runner(model, method, thresholds, theta, results_dir, dtype, device, device_map,
                                  prefill_chunk)
            check_run_config(exp_dir / lb.BENCH.name, _run_config(runner, method, thresholds, theta, max_length))
            lb.run(runner, exp_dir, names, data_dir, limit, max_length)

        _evaluate(lb.BENCH, names if eval_only and datasets else None, exp_dir, eval_only, generate)
    except (UserError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        raise error_exit(err) from err


def infinitebench(
    model: ModelArg = "smollm2-135m",
    exp: ExpOpt = ...,
    tasks: Annotated[list[str] | None, typer.Option(
        help="Tasks, repeated or comma-separated; 'all' for all 12. Default: the 5 of the SALE paper "
             "(with --eval-only: every task with predictions).")] = None,
    method: MethodOpt = Method.dense,
    thresholds: ThresholdsOpt = None,
    theta: ThetaOpt = None,
    limit: LimitOpt = None,
    results_dir: ResultsOpt = Path("results"),
    data_dir: Annotated[Path, typer.Option(help="Folder of the official InfiniteBench <task>.jsonl files.")] = Path(
        "data/infinitebench"),
    max_length: MaxLengthOpt = None,
    template: Annotated[TemplateSet, typer.Option(
        help="Official prompt set: yarn_mistral (completion prompts, as for open models) or gpt4 "
             "(instruction prompts, sent through the chat template).")] = TemplateSet.yarn_mistral,
    scorer: Annotated[Scorer, typer.Option(
        help="Scoring rules: official (InfiniteBench's compute_scores.py) or minference (MInference's variant, "
             "used by the SALE paper); see docs/SCORING.md.")] = Scorer.official,
    eval_only: EvalOnlyOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    prefill_chunk: PrefillChunkOpt = None,
) -> None:
    """Run InfiniteBench with official prompts and scoring; resumable, data-parallel under torchrun."""
    from sale_cli.eval import infinitebench as ib

    try:
        names = parse_names(tasks, ib.ALL_TASKS, ib.PAPER_TASKS, "--tasks")
        _check_prefill_chunk(prefill_chunk)
        exp_dir = experiment_dir(results_dir, exp)

        def generate() -> None:
            ib.check_data(names, data_dir)  # before the model: a missing file fails in seconds
            runner = _load_runner(model, method, thresholds, theta, results_dir, dtype, device, device_map,
                                  prefill_chunk)
            check_run_config(exp_dir / ib.BENCH.name, _run_config(runner, method, thresholds, theta, max_length,
                                                  template=template.value))
            ib.run(runner, exp_dir, names, data_dir, limit, max_length, template.value)

        _evaluate(ib.with_scorer(scorer.value), names if eval_only and tasks else None, exp_dir, eval_only, generate)
    except (UserError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        raise error_exit(err) from err
