from lit_sftrl.core.compute import FlopsCounter, token_counts


def test_flops_are_6nd_for_training_and_2nd_for_inference_plus_the_inherited_start():
    counter = FlopsCounter(num_parameters=1000, initial=7.0)
    counter.add_training(10)
    counter.add_inference(5)
    assert counter.total == 7 + 6 * 1000 * 10 + 2 * 1000 * 5
    restored = FlopsCounter(num_parameters=1)
    restored.load_state_dict(counter.state_dict())
    assert restored.total == counter.total


def test_paper_mode_counts_images_as_1600_tokens_and_rollouts_as_lambda_times_training():
    """A hand-counted batch: two rows of 5 and 3 text tokens with an image each -> 5 + 1600 and 3 + 1600 tokens;
    a PPO update that trained on 100 tokens of GeneralPoints counts 6 x 100 rollout tokens (V-IRL: 5.1 x)."""
    import torch

    from lit_sftrl.core.compute import ComputeConfig
    from lit_sftrl.data.episodes import RolloutSpec
    from lit_sftrl.envs import GENERAL_POINTS_ID, VIRL_ID
    from lit_sftrl.training.ppo import PPOModule

    paper = ComputeConfig(mode="paper")
    batch = {
        "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]), "pixel_values": torch.zeros(2, 1)
    }
    counts = token_counts(batch, tile_tokens=None, tokens_per_image=paper.tokens_per_image)
    assert counts.tolist() == [1605, 1603]
    text_only = {"attention_mask": batch["attention_mask"]}
    assert token_counts(text_only, tokens_per_image=1600).tolist() == [5, 3]
    assert ComputeConfig().tokens_per_image is None  # tokens mode: the image's real tokens

    for env_id, ratio in ((GENERAL_POINTS_ID, 6.0), (VIRL_ID, 5.1)):
        module = PPOModule(compute=paper)
        module.flops = FlopsCounter(num_parameters=10)
        module._count_compute(RolloutSpec(env_id, {}, 1, 1, 0, 0), rollout=None, trained_tokens=100)
        assert module.flops.train_tokens == 100 and module.flops.inference_tokens == round(ratio * 100)
        assert module.flops.total == 10 * (6 * 100 + 2 * ratio * 100)
