"""Why does a PPO update leave (or keep to) its trust region? One rollout from a checkpoint, then the questions:

    python -m bench.ppo_diagnostics --init-from checkpoints/ppo_learning/gp_l/sft/checkpoints/last.ckpt

1. Is the first mini-batch's ratio exactly 1 (rollout log-probs = scoring log-probs)?
2. How much of the backbone's gradient comes from the value loss, how much from the policy loss?
3. After one optimizer step at each learning rate, how far has the policy moved: approx KL per answer and per
   token, and the share of answers whose ratio left [1 - clip, 1 + clip]?

Everything runs on one fixed rollout (64 attempts of 16 GP-L environments, seeded), so the rows compare.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.models.backbone import BackboneConfig, SamplingConfig
from lit_sftrl.training.ppo import (
    PPOConfig,
    PPOModule,
    answer_logprob,
    carried_episode_seeds,
    carried_sampling_seeds,
    ppo_loss,
)
from lit_sftrl.training.rollout import EnvironmentPool, RolloutEngine


def grad_norm(module: PPOModule, loss: torch.Tensor) -> float:
    """Norm of ``loss``'s gradient over the backbone's own weights (the value head left out)."""
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    norms = [
        p.grad.norm() ** 2
        for n, p in module.backbone.named_parameters()
        if p.grad is not None and "value_head" not in n
    ]
    return float(torch.stack(norms).sum().sqrt()) if norms else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", required=True)
    parser.add_argument("--task", default="gp_l")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-5, 1e-5])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=64 if args.task.startswith("gp") else 96)
    config = PPOConfig(normalize_advantages=False)
    module = PPOModule(backbone=BackboneConfig(), init_from=args.init_from, sampling=sampling, ppo=config)
    module.configure_model()
    module.backbone.eval()
    task = TaskConfig(name=args.task)
    task.prepare()
    envs = [task.make_env("id") for _ in range(16)]
    pool = EnvironmentPool(envs, carried_episode_seeds(seed=0, rank=0))  # PPO's first update, rank 0, seed 0
    with torch.no_grad():
        rollout = RolloutEngine(module.backbone, sampling).collect(pool, 64, carried_sampling_seeds(0, 0, update=0))
    attempts = rollout.attempts
    advantages, returns = module._advantages(attempts)
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    old_logprob = torch.stack([answer_logprob(a.token_logprobs, a.token_weights) for a in attempts])
    old_values = torch.tensor([a.value for a in attempts])
    tokens = sum(len(a.answer_ids) for a in attempts) / len(attempts)

    def losses(batch_module: PPOModule):
        scores = batch_module.backbone.score(
            [a.prompt for a in attempts], [a.answer_ids for a in attempts], sampling.temperature
        )
        logprob = torch.stack([answer_logprob(lp, a.token_weights) for lp, a in zip(scores.token_logprobs, attempts)])
        _, stats = ppo_loss(logprob=logprob, old_logprob=old_logprob, advantages=advantages, values=scores.values,
                            old_values=old_values, returns=returns, entropy=scores.entropy,
                            kl=torch.zeros(len(attempts)), config=config)
        return logprob, scores, stats

    record: dict = {"task": args.task, "temperature": args.temperature, "attempts": len(attempts),
                    "mean_answer_tokens": tokens, "mean_reward": sum(a.reward for a in attempts) / len(attempts),
                    "correct_attempts": sum(a.correct for a in attempts),
                    "returns_mean": float(returns.mean()), "returns_std": float(returns.std())}
    logprob, scores, _ = losses(module)
    record["first_minibatch_max_abs_log_ratio"] = float((logprob.detach() - old_logprob).abs().max())
    policy = -(advantages * (logprob - old_logprob).exp()).mean()
    value = 0.5 * ((scores.values - returns) ** 2).mean()
    record["grad_norm_policy"] = grad_norm(module, policy)
    record["grad_norm_value_x_coef"] = grad_norm(module, config.value_coef * value)
    record["value_loss_at_start"] = float(value)
    start = copy.deepcopy(module.state_dict())
    for lr in args.lrs:
        module.load_state_dict(start)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        module.zero_grad(set_to_none=True)  # one step on the whole rollout: surrogate + value loss, clipped at 1
        logprob, scores, _ = losses(module)
        step_policy = -(advantages * (logprob - old_logprob).exp()).mean()
        (step_policy + config.value_coef * 0.5 * ((scores.values - returns) ** 2).mean()).backward()
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        with torch.no_grad():
            _, _, stats = losses(module)
        record[f"lr={lr:g}"] = {"approx_kl_per_answer": float(stats["approx_kl"]),
                               "approx_kl_per_token": float(stats["approx_kl"]) / tokens,
                               "clip_fraction": float(stats["clip_fraction"])}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
