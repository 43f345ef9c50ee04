"""Benchmark: Ray Train's overhead on a fine-tune, against a plain PyTorch loop.

The same fine-tune (XNLI, the embedded e5-small, same batches, same threads) runs as a
plain loop in this process, through a TorchTrainer with 1 worker, and in a one-process Tune
trial (how a one-worker search trial runs), side by side in one session. Steady-state steps per second are measured inside each loop after warm-up
steps; the TorchTrainer's fixed start-up (placement, worker start, model load) is
reported separately. The plain loop and the one-process trial alternate ``--rounds`` times; a loop's
rate is the inverse of its median step. Targets: steady-state overhead within 10% (TorchTrainer) and
within 3% (one-process trial, issue 15).

    .venv/bin/python experiments/bench/train_overhead.py [--steps 30] [--warmup 5] [--threads 1] [--rounds 2]
"""

import argparse
import statistics
import tempfile
import time

import torch

from raysparse.config import parse, RunSpec


def spec_for(args) -> RunSpec:
    return parse(RunSpec, {"data": {"task": "xnli", "languages": ["en"], "max_train_examples": 256, "max_length": 64},
                           "finetune": {"steps": args.steps + args.warmup, "batch_size": 16}})


def timed_steps(model, data, rows, optimizer, steps: int, warmup: int) -> float:
    """Steps per second over ``steps`` steps after ``warmup`` steps: the inverse of the median step time
    (a step the machine stalled on, or a garbage collection, moves a mean; it does not move the median)."""
    model.train()
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss = data.loss(model, data.batch(rows, step, 16))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return 1.0 / statistics.median(times)


def plain(args) -> float:
    return measure({"spec": spec_for(args).model_dump(), "threads": args.threads, "steps": args.steps,
                    "warmup": args.warmup})[0]


def measure(config: dict, prepare=None) -> tuple[float, float]:
    """(steps per second, when the first step could start) of the fine-tune in this process."""
    import raysparse
    from raysparse.training.batches import build_task_model
    from raysparse.training.taskdata import TaskData

    torch.set_num_threads(config["threads"])
    spec = RunSpec.model_validate(config["spec"])
    tokenizer = raysparse.load_tokenizer("embedded")
    model = build_task_model(raysparse.load_model("embedded"), "xnli")
    if prepare is not None:
        model = prepare(model)
    data = TaskData(spec, tokenizer)
    rows = data.pool(["en"])
    ready = time.time()
    rate = timed_steps(model, data, rows, torch.optim.AdamW(model.parameters(), lr=3e-5), config["steps"],
                       config["warmup"])
    return rate, ready


def worker(config: dict) -> None:
    import ray.train

    rate, ready = measure(config, lambda model: ray.train.torch.prepare_model(model, parallel_strategy=None))
    with tempfile.TemporaryDirectory() as folder:   # Result.metrics stays empty without a checkpoint
        ray.train.report({"steps_per_second": rate, "ready_at": ready},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def trial(config: dict) -> None:
    """A one-process search trial: the fine-tune in the Tune trial's own process (no Train worker)."""
    from ray import tune

    rate, ready = measure(config)
    tune.report({"steps_per_second": rate, "ready_at": ready})


def through_tune(args) -> tuple[float, float]:
    from ray import tune

    from raysparse.runner import ensure_ray

    ensure_ray()
    started = time.time()
    config = {"spec": spec_for(args).model_dump(), "threads": args.threads, "steps": args.steps, "warmup": args.warmup}
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": args.threads}), param_space=config,
                       run_config=tune.RunConfig(name=f"bench-trial-{int(started)}", storage_path="/tmp/raysparse-bench"))
    metrics = tuner.fit()[0].metrics or {}
    return metrics.get("steps_per_second", float("nan")), metrics.get("ready_at", float("nan")) - started


def through_ray(args) -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysparse.runner import ensure_ray

    ensure_ray()
    started = time.time()
    trainer = TorchTrainer(worker, train_loop_config={"spec": spec_for(args).model_dump(), "threads": args.threads,
                                                      "steps": args.steps, "warmup": args.warmup},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
                           run_config=RunConfig(name=f"bench-overhead-{int(started)}", storage_path="/tmp/raysparse-bench"))
    result = trainer.fit()
    metrics = result.metrics or {}
    return metrics.get("steps_per_second", float("nan")), metrics.get("ready_at", float("nan")) - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="plain loop and one-process trial, interleaved, this many times each")
    args = parser.parse_args()
    plains, trials, startups = [], [], []
    ray_rate, startup = through_ray(args)
    for _ in range(args.rounds):   # interleaved, so the machine's drift falls on both alike
        plains.append(plain(args))
        rate, ready = through_tune(args)
        trials.append(rate)
        startups.append(ready)
    base, trial_rate = statistics.median(plains), statistics.median(trials)
    print(f"plain loop: {', '.join(f'{r:.3f}' for r in plains)} steps/s (median step; threads {args.threads}, "
          f"batch 16, length 64)")
    print(f"TorchTrainer, 1 worker: {ray_rate:.3f} steps/s; fixed start-up before the first step {startup:.1f} s")
    print(f"one-process Tune trial: {', '.join(f'{r:.3f}' for r in trials)} steps/s; fixed start-up before the "
          f"first step {statistics.median(startups):.1f} s")
    print(f"each round, trial / plain: {', '.join(f'{t / p:.3f}' for p, t in zip(plains, trials))}")
    print(f"steady-state overhead: TorchTrainer {(base / ray_rate - 1) * 100:+.1f}% (target within 10%); "
          f"one-process trial {(base / trial_rate - 1) * 100:+.1f}% (target within 3%)")


if __name__ == "__main__":
    main()
