"""The LightningModules (SFT, PPO), the rollout engine where environments and models meet, evaluation."""
